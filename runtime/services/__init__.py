"""Services: message handling and RTC signaling, written against the ports only."""
