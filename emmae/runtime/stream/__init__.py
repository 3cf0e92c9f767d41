"""The streaming daemon: watch a folder, pick each micrograph once it is complete, journal everything."""
