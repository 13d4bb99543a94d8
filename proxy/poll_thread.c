/* poll_thread.c -- being written */
