"""What every layer shares: settings, database and schema, errors, clock, digests, devices."""
