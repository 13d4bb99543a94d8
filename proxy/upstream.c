/* upstream.c -- being written */
