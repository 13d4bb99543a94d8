/* mailbox.c -- being written */
