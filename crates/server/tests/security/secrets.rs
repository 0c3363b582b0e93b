//! Security: secrets.
