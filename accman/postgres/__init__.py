"""AccMan's store on PostgreSQL (see docs/SCALING.md)."""
