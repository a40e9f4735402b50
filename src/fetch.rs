//! Object downloads. Each object streams to a temporary file beside its target while it is
//! checked (files the user keeps: every gzip member decoded and CRC-checked, Parquet magic at
//! both ends; spool files: by the loader, see [`Delivery`]); only a complete, valid file is
//! renamed into place. A broken transfer resumes with an HTTP `Range`
//! request when the store allows it, else restarts; an expired URL is refreshed. The temporary
//! file is removed on failure, so no partial file is ever left behind.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures_util::StreamExt;
use reqwest::StatusCode;
use reqwest::header::{ACCEPT_RANGES, RANGE};
use tokio::io::{AsyncWriteExt, BufWriter};

use crate::api::types::Format;
use crate::api::{ApiError, Client};

/// A downloaded object.
#[derive(Debug, Clone)]
pub struct Fetched {
    pub object_id: String,
    pub path: PathBuf,
    /// Size on disk (compressed for text formats).
    pub bytes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error(transparent)]
    Api(#[from] ApiError),
    #[error("cannot write {}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("object {object} could not be downloaded after {attempts} attempts: {detail}")]
    Failed { object: String, attempts: u32, detail: String },
}

/// Receives download progress.
pub trait FetchProgress: Send + Sync {
    fn bytes(&self, n: u64);
    fn object_done(&self);
}

/// A file name for each object, taken from its URL path, made safe (no separators, no `..`,
/// never empty) and unique within the job.
pub fn file_names(objects: &[String], urls: &HashMap<String, String>, format: Format) -> Vec<String> {
    let mut taken = HashSet::new();
    objects
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let path = urls.get(id).map(|u| crate::api::redact_url(u)).unwrap_or(id);
            let base = path.rsplit('/').next().unwrap_or_default();
            let safe = base.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
                && !base.starts_with('.')
                && !base.is_empty();
            let base = if safe { base.to_string() } else { format!("part-{i:05}.{}", format.extension()) };
            let (stem, ext) = base.split_once('.').unwrap_or((&base, ""));
            let mut name = base.clone();
            let mut n = 0;
            while !taken.insert(name.clone()) {
                n += 1;
                name = if ext.is_empty() { format!("{stem}-{n}") } else { format!("{stem}-{n}.{ext}") };
            }
            name
        })
        .collect()
}

/// A name safe to use as one path component.
pub fn safe_component(s: &str) -> String {
    let cleaned: String =
        s.chars().map(|c| if c.is_ascii_alphanumeric() || "._-".contains(c) { c } else { '_' }).collect();
    if cleaned.is_empty() || cleaned.chars().all(|c| c == '.') { "_".into() } else { cleaned }
}

/// What a downloaded object is for, which decides how it is checked and kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// A file the user keeps: every gzip member is decoded and CRC-checked (Parquet: magic bytes
    /// at both ends) and the file is fsynced before it counts as fetched.
    Keep,
    /// A spool file for a loader that decodes, and so checks, every byte itself and deletes the
    /// file afterwards: checking here too would inflate every object twice. Only the transfer's
    /// completeness (its `Content-Length`) is checked, and nothing is fsynced.
    Spool,
}

/// Checks an object's bytes as they arrive.
enum Check {
    Gzip(Box<flate2::write::MultiGzDecoder<std::io::Sink>>),
    Parquet {
        len: u64,
        head: Vec<u8>,
        tail: Vec<u8>,
    },
    /// [`Delivery::Spool`]: the loader checks.
    ByTheLoader,
}

impl Check {
    fn new(format: Format, delivery: Delivery) -> Check {
        match delivery {
            Delivery::Spool => Check::ByTheLoader,
            Delivery::Keep if format.is_gzip() => {
                Check::Gzip(Box::new(flate2::write::MultiGzDecoder::new(std::io::sink())))
            }
            Delivery::Keep => Check::Parquet { len: 0, head: Vec::new(), tail: Vec::new() },
        }
    }

    fn feed(&mut self, chunk: &[u8]) -> Result<(), String> {
        match self {
            Check::Gzip(d) => d.write_all(chunk).map_err(|e| format!("corrupt gzip data: {e}")),
            Check::Parquet { len, head, tail } => {
                *len += chunk.len() as u64;
                if head.len() < 4 {
                    head.extend(chunk.iter().take(4 - head.len()));
                }
                tail.extend_from_slice(chunk);
                let cut = tail.len().saturating_sub(4);
                tail.drain(..cut);
                Ok(())
            }
            Check::ByTheLoader => Ok(()),
        }
    }

    fn finish(self) -> Result<(), String> {
        match self {
            Check::Gzip(mut d) => d.try_finish().map_err(|e| format!("incomplete or corrupt gzip data: {e}")),
            Check::Parquet { len, head, tail } if len >= 12 && head == b"PAR1" && tail == b"PAR1" => Ok(()),
            Check::Parquet { .. } => Err("not a complete Parquet file (magic bytes missing)".into()),
            Check::ByTheLoader => Ok(()),
        }
    }
}

/// Downloads `objects` into `dir` with up to `concurrency` transfers at once, each on its own
/// task so that checking (decompressing, for [`Delivery::Keep`]) uses every core; yields them in the given
/// order as they complete, so that a consumer can start on the first while others download.
pub async fn fetch_in_order(
    client: &Client,
    objects: &[String],
    dir: &Path,
    format: Format,
    delivery: Delivery,
    concurrency: usize,
    progress: Arc<dyn FetchProgress>,
) -> Result<impl futures_util::Stream<Item = Result<Fetched, FetchError>> + Send + 'static, FetchError> {
    tokio::fs::create_dir_all(dir).await.map_err(|source| FetchError::Io { path: dir.to_path_buf(), source })?;
    let urls = client.object_urls(objects).await?;
    let names = file_names(objects, &urls, format);
    let plan: Vec<(String, String, PathBuf)> =
        objects.iter().zip(names).map(|(id, name)| (id.clone(), urls[id].clone(), dir.join(name))).collect();
    let client = client.clone();
    let tasks = plan.into_iter().map(move |(id, url, target)| {
        let (client, progress) = (client.clone(), progress.clone());
        tokio::spawn(async move { fetch_one(&client, &id, url, &target, (format, delivery), progress.as_ref()).await })
    });
    Ok(futures_util::stream::iter(tasks)
        .buffered(concurrency.max(1))
        .map(|joined| joined.unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))))
}

async fn fetch_one(
    client: &Client,
    id: &str,
    mut url: String,
    target: &Path,
    kind: (Format, Delivery),
    progress: &dyn FetchProgress,
) -> Result<Fetched, FetchError> {
    let file_name = target.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let temp = target.with_file_name(format!(".{file_name}.partial"));
    let result = transfer(client, id, &mut url, &temp, kind, progress).await;
    match result {
        Ok(bytes) => {
            tokio::fs::rename(&temp, target)
                .await
                .map_err(|source| FetchError::Io { path: target.to_path_buf(), source })?;
            progress.object_done();
            Ok(Fetched { object_id: id.to_string(), path: target.to_path_buf(), bytes })
        }
        Err(e) => {
            let _ = tokio::fs::remove_file(&temp).await;
            Err(e)
        }
    }
}

/// Streams one object into `temp`, resuming or restarting broken transfers; returns its size.
async fn transfer(
    client: &Client,
    id: &str,
    url: &mut String,
    temp: &Path,
    (format, delivery): (Format, Delivery),
    progress: &dyn FetchProgress,
) -> Result<u64, FetchError> {
    let io = |source| FetchError::Io { path: temp.to_path_buf(), source };
    let policy = client.config().retry;
    let create =
        || async { Ok::<_, std::io::Error>(BufWriter::with_capacity(1 << 20, tokio::fs::File::create(temp).await?)) };
    let mut file = create().await.map_err(io)?;
    let mut check = Check::new(format, delivery);
    let mut written: u64 = 0;
    let mut attempt = 0;
    let mut last_error = String::new();
    let mut refreshed = false;
    while attempt < policy.attempts {
        attempt += 1;
        if attempt > 1 {
            tokio::time::sleep(policy.backoff(attempt - 1, None)).await;
        }
        let mut request = client.http().get(url.as_str());
        if written > 0 {
            request = request.header(RANGE, format!("bytes={written}-"));
        }
        let response = match request.send().await {
            Ok(r) => r,
            Err(e) => {
                last_error = crate::api::transport_failure(&e).0;
                continue;
            }
        };
        let status = response.status();
        if status == StatusCode::FORBIDDEN && !refreshed {
            // Most likely an expired pre-signed URL: ask for a fresh one.
            tracing::info!("object {id}: URL refused (HTTP 403); requesting a new one");
            *url = client.object_urls(&[id.to_string()]).await?.remove(id).unwrap_or_default();
            refreshed = true;
            attempt -= 1;
            continue;
        }
        if !(status.is_success()) {
            last_error = format!("HTTP {status} from {}", crate::api::redact_url(url));
            if status.is_client_error() && status != StatusCode::TOO_MANY_REQUESTS && status != StatusCode::FORBIDDEN {
                break;
            }
            continue;
        }
        if written > 0 && status != StatusCode::PARTIAL_CONTENT {
            // The store ignored the Range request: start the file again.
            tracing::info!("object {id}: resuming is not supported here; restarting the download");
            file = create().await.map_err(io)?;
            check = Check::new(format, delivery);
            written = 0;
        }
        let resumable = response.headers().get(ACCEPT_RANGES).is_some_and(|v| v == "bytes");
        let mut body = response.bytes_stream();
        let mut broke = None;
        while let Some(chunk) = body.next().await {
            match chunk {
                Ok(bytes) => {
                    if let Err(e) = check.feed(&bytes) {
                        broke = Some((e, false));
                        break;
                    }
                    file.write_all(&bytes).await.map_err(io)?;
                    written += bytes.len() as u64;
                    progress.bytes(bytes.len() as u64);
                }
                Err(e) => {
                    broke = Some((format!("transfer broke off after {written} bytes: {e}"), resumable));
                    break;
                }
            }
        }
        match broke {
            Some((e, true)) => {
                tracing::info!("object {id}: {e}; resuming");
                last_error = e;
                continue;
            }
            Some((e, false)) => {
                tracing::warn!("object {id}: {e}; downloading it again");
                last_error = e;
            }
            None => {
                let finished = std::mem::replace(&mut check, Check::new(format, delivery)).finish();
                match finished {
                    Ok(()) => {
                        file.flush().await.map_err(io)?;
                        if delivery == Delivery::Keep {
                            file.get_ref().sync_all().await.map_err(io)?;
                        }
                        return Ok(written);
                    }
                    Err(e) => {
                        tracing::warn!("object {id}: {e}; downloading it again");
                        last_error = e;
                    }
                }
            }
        }
        // Corrupt or unresumable: start over.
        file = create().await.map_err(io)?;
        check = Check::new(format, delivery);
        written = 0;
    }
    Err(FetchError::Failed { object: id.to_string(), attempts: attempt, detail: last_error })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_safe_and_unique() {
        let objects: Vec<String> = vec!["j/a".into(), "j/b".into(), "j/c".into(), "j/d".into()];
        let urls: HashMap<String, String> = [
            ("j/a", "http://s/x/part-0.tsv.gz?sig=1"),
            ("j/b", "http://s/y/part-0.tsv.gz?sig=2"),
            ("j/c", "http://s/y/..?sig=3"),
            ("j/d", "http://s/y/?sig=4"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let names = file_names(&objects, &urls, Format::Tsv);
        assert_eq!(names, ["part-0.tsv.gz", "part-0-1.tsv.gz", "part-00002.tsv.gz", "part-00003.tsv.gz"]);
        assert_eq!(safe_component("../etc"), ".._etc");
        assert_eq!(safe_component(".."), "_");
    }

    #[test]
    fn checks_catch_truncated_gzip_and_parquet() {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(&b"meta.ts\tkey.id\n".repeat(100)).unwrap();
        let gz = e.finish().unwrap();
        let run = |bytes: &[u8], f: Format| {
            let mut c = Check::new(f, Delivery::Keep);
            bytes.chunks(7).try_for_each(|ch| c.feed(ch)).and_then(|_| c.finish())
        };
        assert!(run(&gz, Format::Tsv).is_ok());
        assert!(run(&[gz.clone(), gz.clone()].concat(), Format::Csv).is_ok(), "multi-member gzip");
        assert!(run(&gz[..gz.len() - 8], Format::Tsv).is_err());
        assert!(run(b"PAR1-----------PAR1", Format::Parquet).is_ok());
        assert!(run(b"PAR1-----------PAR", Format::Parquet).is_err());
    }
}
