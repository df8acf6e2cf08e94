"""Code shared by every push-functions function: storage, auth, events, providers."""
