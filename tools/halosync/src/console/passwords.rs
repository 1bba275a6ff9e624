//! Password checks (argon2, ~19 MiB of working memory each) on a fixed set
//! of threads of their own, `console.login_concurrency` of them, each
//! reusing one buffer of argon2 blocks.
//!
//! On tokio's blocking pool each check could land on a new thread (up to
//! 512) and allocate its 19 MiB afresh, which glibc keeps in that thread's
//! arena: 60 concurrent sign-ins once took the console from 953 to 1,942
//! MiB for good. Here each checker allocates its blocks once
//! (`Argon2::hash_password_into_with_memory`), so the memory is bounded by
//! `threads × 19 MiB`; a sign-in waits for a free checker a short while,
//! then gets 429 (see the login handler).

use std::sync::mpsc;
use std::sync::Mutex;

use tokio::sync::oneshot;

type Job = (String, String, oneshot::Sender<bool>);

pub struct PasswordChecker {
    jobs: Mutex<mpsc::Sender<Job>>,
    /// At most one job per thread is handed over; the rest wait here.
    free: tokio::sync::Semaphore,
}

impl PasswordChecker {
    /// Starts `threads` checker threads (they live as long as the process).
    pub fn start(threads: usize) -> std::io::Result<PasswordChecker> {
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = std::sync::Arc::new(Mutex::new(rx));
        for i in 0..threads.max(1) {
            let rx = rx.clone();
            std::thread::Builder::new()
                .name(format!("password-check-{i}"))
                .spawn(move || {
                    let mut blocks: Vec<argon2::Block> = Vec::new();
                    loop {
                        let job = match rx.lock() {
                            Ok(r) => r.recv(),
                            Err(_) => return,
                        };
                        let Ok((password, hash, answer)) = job else {
                            return;
                        };
                        let _ = answer.send(verify_with(&mut blocks, &password, &hash));
                    }
                })?;
        }
        Ok(PasswordChecker {
            jobs: Mutex::new(tx),
            free: tokio::sync::Semaphore::new(threads.max(1)),
        })
    }

    /// Checks `password` against the PHC `hash`; `None` when no checker
    /// became free within `wait` (the caller answers 429).
    pub async fn verify(
        &self,
        password: String,
        hash: String,
        wait: std::time::Duration,
    ) -> Option<bool> {
        let permit = tokio::time::timeout(wait, self.free.acquire())
            .await
            .ok()?
            .ok()?;
        let (answer, result) = oneshot::channel();
        self.jobs.lock().ok()?.send((password, hash, answer)).ok()?;
        let ok = result.await.unwrap_or(false);
        drop(permit);
        Some(ok)
    }
}

/// The most argon2 memory a configured hash may ask for (1 GiB): a hash
/// beyond it is refused rather than allocated.
const MAX_BLOCKS: usize = 1 << 20;

/// Whether `password` matches the PHC string `phc` (argon2 only), using
/// `blocks` as argon2's memory (grown once to the hash's `m` cost, then
/// reused). The same computation as `argon2`'s `PasswordVerifier`, with
/// the comparison in constant time.
pub fn verify_with(blocks: &mut Vec<argon2::Block>, password: &str, phc: &str) -> bool {
    use argon2::password_hash::phc::PasswordHash;
    use argon2::{Algorithm, Argon2, Params, Version};
    let Ok(parsed) = PasswordHash::new(phc) else {
        return false;
    };
    let (Some(salt), Some(expected)) = (&parsed.salt, &parsed.hash) else {
        return false;
    };
    let Ok(algorithm) = Algorithm::try_from(parsed.algorithm.as_str()) else {
        return false;
    };
    let version = match parsed.version.map(Version::try_from) {
        None => Version::default(),
        Some(Ok(v)) => v,
        Some(Err(_)) => return false,
    };
    let Ok(params) = Params::try_from(&parsed) else {
        return false;
    };
    let n = params.block_count();
    if n > MAX_BLOCKS {
        return false;
    }
    if blocks.len() < n {
        blocks.resize(n, argon2::Block::default());
    }
    let expected = expected.as_bytes();
    let mut out = vec![0u8; expected.len()];
    let Some(memory) = blocks.get_mut(..n) else {
        return false;
    };
    Argon2::new(algorithm, version, params)
        .hash_password_into_with_memory(password.as_bytes(), salt.as_ref(), &mut out, memory)
        .is_ok()
        && out.len() == expected.len()
        && out
            .iter()
            .zip(expected)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

#[cfg(test)]
mod tests {
    use super::verify_with;

    #[test]
    fn checks_like_argon2_itself_with_reused_memory() {
        let hash = crate::console::settings::hash_password("right").unwrap();
        let mut blocks = Vec::new();
        assert!(verify_with(&mut blocks, "right", &hash));
        let cap = blocks.capacity();
        assert!(!verify_with(&mut blocks, "wrong", &hash));
        assert!(!verify_with(&mut blocks, "right", "not a hash"));
        assert!(crate::console::settings::verify_password("right", &hash));
        assert_eq!(blocks.capacity(), cap, "the memory is reused");
    }
}
