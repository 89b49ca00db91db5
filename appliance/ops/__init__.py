"""Operating the appliance: scheduler, housekeeping, init, backup/restore, doctor, service lock."""
