"""The serving process: uvicorn, systemd notification and watchdog, logs."""
