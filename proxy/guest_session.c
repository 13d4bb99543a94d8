/* guest_session.c -- being written */
