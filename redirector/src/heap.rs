//! The daemon's heap after a large change.
//!
//! glibc's allocator keeps what a reconcile of thousands of pods freed (the
//! old parts, the parser threads' arenas) mapped for the next allocation,
//! so a node that filled and settled would stay at its peak resident size.
//! Handing the free pages back after such a change keeps the daemon's RSS
//! at what it holds.

/// How many pods a change must touch before its freed memory is handed
/// back: `malloc_trim` walks every arena, 10-15 ms at 10,000 pods, too much
/// for each one-pod event.
pub const LARGE_CHANGE: usize = 1024;

/// How long after a large change the pages are handed back: the changes
/// that often follow one (a node filling, then its pods starting) are not
/// kept waiting behind the walk, and their garbage goes back with it.
pub const SETTLE: std::time::Duration = std::time::Duration::from_secs(2);

/// How many arenas glibc's allocator keeps (`M_ARENA_MAX`): by default
/// eight per CPU, so each parser and survey thread of a fill gets one of
/// its own, which stays resident between fills. With two, every thread
/// (the runtime's workers, the fill's threads) shares the main arena or
/// one more: a thread started later is given them in turn, so threads
/// that work at once are started one after the other, the caller waiting
/// (a parser beside the controller's thread would share its arena's lock
/// every other fill, and parse at half speed then).
const ARENAS: i32 = 2;

/// Sets glibc's allocator up for a daemon that holds a node's pods and
/// starts threads only for large changes ([`ARENAS`]), unless the
/// operator set `MALLOC_ARENA_MAX` (or glibc's tunable) for it. A no-op
/// with other allocators.
pub fn configure() {
    if std::env::var_os("MALLOC_ARENA_MAX").is_some()
        || std::env::var("GLIBC_TUNABLES").is_ok_and(|t| t.contains("arena_max"))
    {
        return;
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets the allocator's parameters; called first
    // thing in `main`, before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, ARENAS);
    }
}

/// Returns the heap's free pages to the kernel (`malloc_trim(3)`, glibc
/// 2.8 and later trim every arena). A no-op with other allocators.
pub fn release_free_pages() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists; it
    // takes the arenas' locks like any allocation.
    unsafe {
        libc::malloc_trim(0);
    }
}
