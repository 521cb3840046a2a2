//! Rebuilds the crate when a migration is added: `sqlx::migrate!` embeds the
//! files of `migrations/` at compile time but only tracks those it saw.

fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
