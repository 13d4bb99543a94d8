/* listener.c -- being written */
