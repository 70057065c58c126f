"""POP3: the server protocol (RFC 1939, 2449, 2595, 5034) over any mailbox backend."""
