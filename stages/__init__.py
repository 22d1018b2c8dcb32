"""One thin module per pipeline stage: its click command, also the DVC entry point."""
