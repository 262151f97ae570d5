//! The allocator's tuning, which the launchers of the processes set in their environment.
//!
//! The binary's allocator is mimalloc (`main.rs`). It gives a page back to the OS ("purges"
//! it) once the page has been unused for `purge_delay`, 1 s by default; the next allocation
//! there faults it back in, zeroed. The engine's work comes in bursts (a group's statement
//! buffers, a batch of messages), so at 1 s it gave back and faulted in the same memory over
//! and over: ~27,000 minor faults per distributed 3,000-instance run against ~14,000 at 10 s
//! (the same as never purging), and ~4 % of the engine's CPU (docs/benchmarks.md, round 14).
//! At 10 s, memory idle that long still goes back.
//!
//! mimalloc reads its options from the environment when the process loads, before `main`, and
//! setting one from inside would take unsafe code, which the workspace forbids. So the
//! launchers set it: the bench's distributed deployment (`bench/launch.rs`),
//! `scripts/distributed.sh` and the Helm chart (`allocator.purgeDelayMs`). A value already in
//! the environment is kept.

/// The variables and values every engine process is started with.
pub const ALLOCATOR_ENV: [(&str, &str); 1] = [("MIMALLOC_PURGE_DELAY", "10000")];

/// [`ALLOCATOR_ENV`] without the variables this process's environment already sets (those
/// are inherited as they are).
pub fn allocator_env() -> impl Iterator<Item = (&'static str, &'static str)> {
    unset_of(|name| std::env::var_os(name).is_some())
}

/// [`ALLOCATOR_ENV`] but the variables `is_set` says are set.
fn unset_of(is_set: impl Fn(&str) -> bool) -> impl Iterator<Item = (&'static str, &'static str)> {
    ALLOCATOR_ENV
        .into_iter()
        .filter(move |(name, _)| !is_set(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_variable_already_set_is_inherited_not_replaced() {
        assert_eq!(
            unset_of(|_| false).collect::<Vec<_>>(),
            vec![("MIMALLOC_PURGE_DELAY", "10000")]
        );
        assert_eq!(unset_of(|name| name == "MIMALLOC_PURGE_DELAY").count(), 0);
    }
}
