"""Ways events enter the gateway: MQTT (``flux.ingest.mqtt``) and the embedded broker."""
