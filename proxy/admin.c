/* admin.c -- being written */
