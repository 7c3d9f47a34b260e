"""Speech and language providers behind small interfaces (see base.py), chosen per agent."""
