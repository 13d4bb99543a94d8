/* vm_identity.c -- being written */
