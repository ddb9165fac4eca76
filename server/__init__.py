"""Online gRPC front end (arrives with the front-end issue)."""
