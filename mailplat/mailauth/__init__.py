"""Message authentication: DKIM, SPF, DMARC and the Authentication-Results header."""
