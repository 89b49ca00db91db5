"""What every layer shares: settings, the database and its schema, errors, clock, digests, devices."""
