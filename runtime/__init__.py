"""The imhub runtime: gateway, message service, RTC service and their adapters."""
