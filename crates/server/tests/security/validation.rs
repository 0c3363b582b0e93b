//! Security: validation.
