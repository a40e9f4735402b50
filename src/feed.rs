//! The stream of typed records between a source and a target; neither owns it. A source sends
//! each part (a downloaded object, a range of the mirror) as `Begin`, row batches and `End`, then
//! `Done`; a feed that closes before `Done` was aborted by its source, and the target must keep
//! nothing of the unfinished part. [`Pump`] is the one reader of a feed's pieces that every target
//! uses: it hands out row batches up to the end of a part or of the whole feed.

use std::sync::Arc;

/// How a feed can fail a target reading it (the target's own errors wrap it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FeedError {
    /// The source stopped before its `Done`: the target keeps nothing of the unfinished part.
    #[error("the source stopped before the end of its rows; nothing of the unfinished part was kept")]
    Aborted,
    /// The source sent rows outside a part: a bug of the source, not of the data.
    #[error("the source sent rows outside a part (rows or an end before the part's beginning)")]
    Broken,
}

use crate::decode::Record;
use crate::progress::TableProgress;

/// One item of a feed of records from a source.
#[derive(Debug)]
pub enum Piece {
    /// A part (a downloaded object) begins.
    Begin(String),
    Rows(Vec<Record>),
    /// The part is complete: for initdb, its rows and its checkpoint commit now.
    End(String),
    /// The feed is complete.
    Done,
}

/// The receiving end of a feed. A feed that closes before [`Piece::Done`] was aborted by its
/// source: the target must keep nothing of the unfinished part.
pub struct Feed {
    rx: tokio::sync::mpsc::Receiver<Piece>,
    /// The first piece, once [`Feed::ready`] has waited for it.
    first: Option<Piece>,
    /// Told of the rows the target takes, for the progress line.
    watch: Option<Arc<TableProgress>>,
}

/// The sending end of a feed.
pub type FeedSender = tokio::sync::mpsc::Sender<Piece>;

impl Feed {
    /// A feed holding at most `depth` pieces in flight (a few batches: memory stays bounded).
    pub fn channel(depth: usize) -> (FeedSender, Feed) {
        let (tx, rx) = tokio::sync::mpsc::channel(depth.max(1));
        (tx, Feed { rx, first: None, watch: None })
    }

    /// The same feed, counting the rows the target takes into `watch`.
    pub fn watched_by(self, watch: Arc<TableProgress>) -> Feed {
        Feed { watch: Some(watch), ..self }
    }

    /// Hands a piece on, counting its rows.
    fn counted(&self, piece: Piece) -> Piece {
        if let (Some(watch), Piece::Rows(rows)) = (&self.watch, &piece) {
            watch.rows(rows.len() as u64);
        }
        piece
    }

    /// Waits until the source has produced its first piece (kept for [`Feed::next`]). The
    /// orchestrator hands a feed to a target only then, so that a table still waiting for its
    /// download slot never holds a database connection that a downloading table needs.
    pub async fn ready(&mut self) -> Result<(), FeedError> {
        if self.first.is_none() {
            self.first = Some(self.rx.recv().await.ok_or(FeedError::Aborted)?);
        }
        Ok(())
    }

    /// The next piece, or [`FeedError::Aborted`] when the source stopped early.
    pub async fn next(&mut self) -> Result<Piece, FeedError> {
        let piece = match self.first.take() {
            Some(p) => p,
            None => self.rx.recv().await.ok_or(FeedError::Aborted)?,
        };
        Ok(self.counted(piece))
    }
}

/// How much of a feed one load takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Span {
    /// One snapshot part, up to its `End` (initdb's unit of commit).
    Part,
    /// Every change of a sync, up to `Done` (parts do not matter).
    Feed,
}

/// Row batches of a feed up to the end of a part or of the feed: what a target's loader reads.
pub struct Pump<'a> {
    feed: &'a mut Feed,
    span: Span,
    /// The piece that ended the span, once reached.
    ended: Option<Piece>,
    rows: u64,
}

impl<'a> Pump<'a> {
    pub fn new(feed: &'a mut Feed, span: Span) -> Pump<'a> {
        Pump { feed, span, ended: None, rows: 0 }
    }

    /// The next batch of records, or `None` at the end of the span.
    pub async fn next_batch(&mut self) -> Result<Option<Vec<Record>>, FeedError> {
        while self.ended.is_none() {
            match self.feed.next().await? {
                Piece::Rows(batch) => {
                    self.rows += batch.len() as u64;
                    return Ok(Some(batch));
                }
                Piece::Begin(_) => {}
                Piece::End(_) if self.span == Span::Feed => {}
                end @ (Piece::End(_) | Piece::Done) => self.ended = Some(end),
            }
        }
        Ok(None)
    }

    /// Records handed out so far.
    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// The part that ended (for [`Span::Part`]): its name, once every batch was taken. A part
    /// that ended with the feed's `Done` instead was cut off.
    pub fn ended_part(&self) -> Result<&str, FeedError> {
        match &self.ended {
            Some(Piece::End(part)) => Ok(part),
            _ => Err(FeedError::Aborted),
        }
    }
}

/// Reads the parts of a snapshot feed: the name of the next part (after its `Begin`), or `None`
/// after `Done`. A part that begins without its `Begin` is a broken source.
pub async fn next_part(feed: &mut Feed) -> Result<Option<String>, FeedError> {
    match feed.next().await? {
        Piece::Begin(part) => Ok(Some(part)),
        Piece::Done => Ok(None),
        Piece::Rows(_) | Piece::End(_) => Err(FeedError::Broken),
    }
}
