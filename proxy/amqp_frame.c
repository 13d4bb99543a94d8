/* amqp_frame.c -- being written */
