"""The plugin host: hook specifications, the plugin manager (adapters, methods, models) and the built-ins."""
