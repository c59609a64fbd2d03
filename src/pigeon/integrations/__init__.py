"""Task frameworks on pigeon's broker: one adapter per framework, each an optional extra."""
