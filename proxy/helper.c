/* helper.c -- being written */
