"""The edge: FastAPI app with the WebSocket protocol, REST routes and the demo page."""
