"""Engine adapters: translate an engine's objects to kvconnect's neutral API, nothing more."""
