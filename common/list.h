/* list.h -- intrusive doubly linked lists whose nodes name their own link
 * fields, so that one node can be on several lists (a guest connection is
 * on its VM's and on its thread's). A list is the pointer to its first
 * node; NULL ends it. Arguments are evaluated more than once: pass plain
 * lvalues. */
#pragma once

#include <stddef.h>

/* Put node N at the front of the list HEAD, linked through its fields PREV
 * and NEXT. */
#define DLIST_PUSH(head, n, prev, next)            \
	do {                                       \
		(n)->prev = NULL;                  \
		(n)->next = (head);                \
		if (head)                          \
			(head)->prev = (n);        \
		(head) = (n);                      \
	} while (0)

/* Take node N off the list HEAD; its links are cleared. */
#define DLIST_UNLINK(head, n, prev, next)          \
	do {                                       \
		if ((n)->prev)                     \
			(n)->prev->next = (n)->next; \
		else                               \
			(head) = (n)->next;        \
		if ((n)->next)                     \
			(n)->next->prev = (n)->prev; \
		(n)->prev = (n)->next = NULL;      \
	} while (0)
