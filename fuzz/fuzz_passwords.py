"""Password verification (mailplat.passwords.verify_password): whatever a
users file holds as the stored hash, verifying a password against it
returns True or False, never raises and logs no Failure (a login is
refused, never a traceback and a 451); and a {PLAIN} hash matches only its
own password, only where allowed.

argon2id costs what the parameters in the hash say; the dummy hash (checked
for unknown users and refused hashes, to keep timing even) is made with the
module's hasher, which is given cheap parameters here, as are the corpus's
hashes: what is fuzzed is how stored hashes are read, at fuzzing speed.

Input: the stored hash on the first line, the password after it (UTF-8,
undecodable bytes replaced); a first line starting with "+" allows {PLAIN}.
"""

from __future__ import annotations

import re

import argon2
import harness

with harness.instrumented():
    from mailplat import passwords
    from mailplat.passwords import verify_password

passwords._hasher = argon2.PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)
passwords._dummy.cache_clear()


_BCRYPT_COST = re.compile(r"\$2[aby]\$([0-9]+)\$")


def costly(stored: str) -> bool:
    """A hash that asks for more work than a fuzz run can pay (bcrypt's cost
    24 is 2**24 rounds, minutes per check): such a hash is checked as slowly
    as it asks, so it is left out here (bounding it is the users file's
    check, not verify_password's)."""
    bcrypt_cost = _BCRYPT_COST.search(stored)
    if bcrypt_cost and int(bcrypt_cost.group(1)) > 12:
        return True
    at = stored.find("$argon2")
    if at >= 0:
        try:
            parameters = argon2.extract_parameters(stored[at:])
        except (argon2.exceptions.InvalidHashError, ValueError):
            return False
        return parameters.time_cost * parameters.memory_cost > 16 * 65536 or parameters.parallelism > 16
    return False


def test_one(data: bytes) -> None:
    text = data.decode("utf-8", "replace")
    stored, _, password = text.partition("\n")
    allow_plain = stored.startswith("+")
    if allow_plain:
        stored = stored[1:]
    if costly(stored):
        return
    result = verify_password(stored, password, allow_plain=allow_plain)
    if result is not True and result is not False:
        raise harness.Crash(f"verify_password returned {result!r}")
    if stored[:7].upper() == "{PLAIN}" and result != (allow_plain and stored[7:] == password):
        raise harness.Crash(f"{{PLAIN}} with allow_plain={allow_plain}: {stored!r} against {password!r} gave {result}")


if __name__ == "__main__":
    # A hash it cannot use is logged as an error, and is no crash; a Failure
    # logged means argon2 or bcrypt raised on what passwords.py let through.
    harness.main(test_one, errors=False)
