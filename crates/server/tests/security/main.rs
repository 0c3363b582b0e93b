//! The server's security boundary (issue 12): what a key holder sends never reaches the server's
//! environment, its files, other topics or other keys' work.

#[path = "../common/mod.rs"]
mod common;

mod files;
mod secrets;
mod validation;
