"""Queue backends, one module each, chosen by URL scheme (see ``pigeon.queue``)."""
