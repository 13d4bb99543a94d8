/* partition.c -- being written */
