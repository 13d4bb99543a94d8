/* guest_conn.c -- being written */
