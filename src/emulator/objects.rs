//! Objects: pre-signed URLs that expire, and part files generated once per content (on first
//! download, or when a commit prepares them) into a spool directory, so that they can be served
//! with `Content-Length` and `Range` like S3 does.

use std::collections::{HashMap, HashSet};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tokio::sync::OnceCell;

use super::auth::sign;
use crate::time::Micros;

/// The URL at which `object_id` can be downloaded until `expires` (Unix microseconds).
pub fn signed_url(base: &str, key: &[u8], object_id: &str, expires: Micros) -> String {
    let sig = sign(key, format!("{object_id}\n{expires}").as_bytes());
    format!("{base}/objects/{object_id}?X-Amz-Expires={expires}&X-Amz-Signature={sig}")
}

#[derive(Debug, PartialEq, Eq)]
pub enum UrlError {
    BadSignature,
    Expired,
}

pub fn verify_url(key: &[u8], object_id: &str, expires: Micros, signature: &str, now: Micros) -> Result<(), UrlError> {
    if sign(key, format!("{object_id}\n{expires}").as_bytes()) != signature {
        Err(UrlError::BadSignature)
    } else if expires <= now {
        Err(UrlError::Expired)
    } else {
        Ok(())
    }
}

type Slot = Arc<OnceCell<PathBuf>>;

/// The spooled objects, one file per distinct content: an object id is `{job}/{name}`, and
/// the name carries the tag of what the object holds, so jobs with equal content (an identical
/// query, a prepared increment, a `since` a little earlier) share one file, made once.
pub struct ObjectStore {
    dir: tempfile::TempDir,
    files: Mutex<HashMap<String, Spooled>>,
}

struct Spooled {
    slot: Slot,
    /// The jobs that served it: the file goes when the last of them expires.
    jobs: HashSet<String>,
}

/// An object id's job and content name.
fn split_id(object_id: &str) -> (&str, &str) {
    object_id.split_once('/').unwrap_or(("", object_id))
}

impl ObjectStore {
    pub fn new() -> io::Result<ObjectStore> {
        Ok(ObjectStore {
            dir: tempfile::Builder::new().prefix("dap-emulator-objects-").tempdir()?,
            files: Mutex::new(HashMap::new()),
        })
    }

    /// The spooled file of `object_id`'s content, written by `make` the first time any job asks
    /// for it.
    pub async fn materialize<F>(&self, object_id: &str, make: F) -> io::Result<PathBuf>
    where
        F: FnOnce(&Path) -> io::Result<()> + Send + 'static,
    {
        let (job, name) = split_id(object_id);
        let slot = {
            let mut files = self.files.lock().expect("object store lock");
            let spooled = files
                .entry(name.to_string())
                .or_insert_with(|| Spooled { slot: Slot::default(), jobs: HashSet::new() });
            spooled.jobs.insert(job.to_string());
            spooled.slot.clone()
        };
        let path = self.dir.path().join(name);
        slot.get_or_try_init(|| async move {
            let tmp = path.with_extension("partial");
            let target = tmp.clone();
            tokio::task::spawn_blocking(move || make(&target)).await.map_err(io::Error::other)??;
            tokio::fs::rename(&tmp, &path).await?;
            Ok::<_, io::Error>(path)
        })
        .await
        .cloned()
    }

    /// Deletes the spooled files that only expired jobs served.
    pub fn forget_jobs(&self, job_ids: &[String]) {
        let mut files = self.files.lock().expect("object store lock");
        files.retain(|_, spooled| {
            spooled.jobs.retain(|j| !job_ids.contains(j));
            let keep = !spooled.jobs.is_empty();
            if !keep && let Some(path) = spooled.slot.get() {
                let _ = std::fs::remove_file(path);
            }
            keep
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_signed_and_expire() {
        let url = signed_url("http://h", b"k", "job/part-0.tsv.gz", 500);
        let sig = url.split("X-Amz-Signature=").nth(1).unwrap();
        assert_eq!(verify_url(b"k", "job/part-0.tsv.gz", 500, sig, 499), Ok(()));
        assert_eq!(verify_url(b"k", "job/part-0.tsv.gz", 500, sig, 500), Err(UrlError::Expired));
        assert_eq!(verify_url(b"k", "job/part-1.tsv.gz", 500, sig, 1), Err(UrlError::BadSignature));
        assert_eq!(verify_url(b"k", "job/part-0.tsv.gz", 501, sig, 1), Err(UrlError::BadSignature));
    }

    #[tokio::test]
    async fn objects_are_generated_once() {
        let store = ObjectStore::new().unwrap();
        let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        for job in ["j", "j", "k"] {
            let c = calls.clone();
            let p = store
                .materialize(&format!("{job}/part-0-tag"), move |path| {
                    c.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    std::fs::write(path, b"data")
                })
                .await
                .unwrap();
            assert_eq!(std::fs::read(p).unwrap(), b"data");
        }
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 1, "equal content is made once");
        store.forget_jobs(&["j".to_string()]);
        assert_eq!(store.files.lock().unwrap().len(), 1, "job k still serves it");
        store.forget_jobs(&["k".to_string()]);
        assert!(store.files.lock().unwrap().is_empty());
        assert_eq!(std::fs::read_dir(store.dir.path()).unwrap().count(), 0, "the file is gone");
    }
}
