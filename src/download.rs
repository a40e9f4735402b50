//! `snapshot` and `incremental` of one table into `<output>/job_<id>/`, objects kept as the
//! server sends them (gzip for text formats), as the official client lays them out.

use std::path::PathBuf;
use std::sync::Arc;

use futures_util::StreamExt;
use serde::Serialize;

use crate::api::types::{Format, Query};
use crate::api::{ApiError, Client};
use crate::error::{Classify, Retry};
use crate::fetch::{self, FetchError};
use crate::progress::TableProgress;
use crate::time::{self, Micros};

#[derive(Debug, Clone)]
pub struct DownloadRequest {
    pub namespace: String,
    pub format: Format,
    /// `None` for a snapshot.
    pub since: Option<Micros>,
    pub until: Option<Micros>,
    pub output_dir: PathBuf,
    pub download_concurrency: usize,
    /// Tables that download at once; the others wait for their job or for a slot.
    pub transfers: Arc<tokio::sync::Semaphore>,
}

impl DownloadRequest {
    pub fn query(&self) -> Query {
        Query {
            format: self.format,
            mode: None,
            since: self.since.map(time::format_wire),
            until: self.until.map(time::format_wire),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct FileEntry {
    pub path: PathBuf,
    pub bytes: u64,
}

/// What one table's export produced (the `--json` result).
#[derive(Debug, Clone, Serialize)]
pub struct ExportResult {
    pub job_id: String,
    pub schema_version: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub until: Option<String>,
    pub directory: PathBuf,
    pub files: Vec<FileEntry>,
}

#[derive(Debug, thiserror::Error)]
pub enum DownloadError {
    #[error(transparent)]
    Api(#[from] ApiError),
    #[error(transparent)]
    Fetch(#[from] FetchError),
}

impl Classify for DownloadError {
    fn retry(&self) -> Retry {
        match self {
            DownloadError::Api(e) | DownloadError::Fetch(FetchError::Api(e)) => e.retry(),
            DownloadError::Fetch(_) => Retry::MayHelp,
        }
    }

    fn is_fatal(&self) -> bool {
        match self {
            DownloadError::Api(e) | DownloadError::Fetch(FetchError::Api(e)) => e.is_fatal(),
            DownloadError::Fetch(_) => false,
        }
    }
}

pub async fn download_table(
    client: &Client,
    request: &DownloadRequest,
    table: &str,
    progress: &Arc<TableProgress>,
) -> Result<ExportResult, DownloadError> {
    progress.stage("submitting query");
    let job = client.run_job(&request.namespace, table, &request.query(), |s| progress.stage(s.describe())).await?;
    tracing::debug!("{table}: job {} complete with {} objects", job.id, job.objects.len());
    let _slot = request.transfers.acquire().await.expect("the transfer semaphore is never closed");
    let directory = request.output_dir.join(format!("job_{}", fetch::safe_component(&job.id)));
    progress.downloading(job.objects.len());
    let downloads = fetch::fetch_in_order(
        client,
        &job.objects,
        &directory,
        request.format,
        fetch::Delivery::Keep,
        request.download_concurrency,
        progress.clone(),
    )
    .await?;
    let fetched: Vec<Result<fetch::Fetched, FetchError>> = downloads.collect().await;
    let files = fetched
        .into_iter()
        .map(|f| f.map(|f| FileEntry { path: f.path, bytes: f.bytes }))
        .collect::<Result<Vec<_>, _>>()?;
    let total: u64 = files.iter().map(|f| f.bytes).sum();
    progress.finish(&format!("done: {} files, {:.1} MB in {}", files.len(), total as f64 / 1e6, directory.display()));
    Ok(ExportResult {
        job_id: job.id,
        schema_version: job.schema_version,
        at: job.at,
        since: job.since,
        until: job.until,
        directory,
        files,
    })
}
