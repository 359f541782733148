"""SFD Lab."""
