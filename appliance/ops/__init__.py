"""Operating the appliance: scheduler, housekeeping, init, backup and restore, doctor, the service lock."""
