/* control.h -- "vmproxy-consumer control VM JSON": one control message to a
 * VM's inbox (exchange vm.control, routing key "<uuid>.control"), published
 * mandatory and with publisher confirms, so the exit status says whether
 * the VM's inbox took it. */
#pragma once

enum control_exit {
	CONTROL_OK = 0,       /* confirmed and routed to the VM's inbox */
	CONTROL_FAILED = 1,   /* configuration, connection or broker error */
	CONTROL_USAGE = 2,    /* bad arguments, or JSON that is not an object */
	CONTROL_NO_INBOX = 3, /* unroutable: the VM has no inbox (yet) */
	CONTROL_NACKED = 4,   /* the broker refused it (the inbox is full) */
	CONTROL_NO_VM = 5,    /* no VM (or more than one) of that name in the store */
	CONTROL_TIMEOUT = 6,  /* no confirm within --timeout */
};

/* ARGV[0] is "control". Returns an enum control_exit. */
int control_main(int argc, char **argv);
