//! The `operations` table: long-running operations (image imports). A row is written when an
//! operation starts and when it ends; its progress lives in memory meanwhile.

use super::db::{params, Db, DbResult, OptionalExtension, Row};

use super::{now, Store};
use crate::api::{rfc3339, ErrorDetail, Image, Operation, OperationProgress, OperationState};
use crate::error::Result;

/// Finished operations kept in the store (the oldest go first); running ones are always kept.
pub const KEEP_OPERATIONS: i64 = 1000;

impl Store {
    /// Marks the operations a previous daemon left running as failed. Blocking: called once
    /// at start, before serving.
    /// This node's (the imports run where they were asked).
    pub fn fail_interrupted_operations(&self) -> Result<usize> {
        let node = self.fence.node();
        self.blocking(|c| recover(c, node.as_deref()))
    }

    /// Records a new running import of image `name` (`request`: its body, as JSON).
    pub async fn insert_operation(
        &self,
        id: &str,
        name: &str,
        request: &str,
    ) -> Result<Option<Operation>> {
        let (i, n, r) = (id.to_string(), name.to_string(), request.to_string());
        let node = self.fence.node();
        self.call(move |c| insert_op(c, &i, &n, &r, node.as_deref()))
            .await
    }

    pub async fn get_operation(&self, id: &str) -> Result<Option<Operation>> {
        let id = id.to_string();
        self.call(move |c| get_op(c, &id)).await
    }

    /// Ends an operation: its final state, progress, error or result.
    pub async fn finish_operation(
        &self,
        id: &str,
        progress: OperationProgress,
        outcome: std::result::Result<Image, ErrorDetail>,
    ) -> Result<()> {
        let id = id.to_string();
        self.call(move |c| finish_op(c, &id, &progress, outcome.as_ref()))
            .await
    }
}

/// Marks the operations a previous daemon left running as failed. Called once at start.
pub(super) fn recover(conn: &Db, node: Option<&str>) -> Result<usize> {
    let error = serde_json::to_string(&ErrorDetail::new(
        "interrupted",
        "the daemon stopped before the import finished; start it again",
    ))
    .unwrap_or_default();
    Ok(conn.execute(
        "UPDATE operations SET state = 'failed', phase = 'failed', error = ?1,
             updated_at = ?2 WHERE state = 'running' \
             AND (CAST(?3 AS TEXT) IS NULL OR node = ?3 OR node IS NULL)",
        params![error, now(), node],
    )?)
}

const OP_COLUMNS: &str = "id, kind, state, phase, bytes_done, bytes_total, error, result, \
                          created_at, updated_at";

fn op_from_row(r: &Row) -> DbResult<Operation> {
    let state: String = r.get(2)?;
    let error: Option<String> = r.get(6)?;
    let result: Option<String> = r.get(7)?;
    Ok(Operation {
        id: r.get(0)?,
        kind: r.get(1)?,
        state: match state.as_str() {
            "running" => OperationState::Running,
            "succeeded" => OperationState::Succeeded,
            _ => OperationState::Failed,
        },
        progress: OperationProgress {
            phase: r.get(3)?,
            bytes_done: r.get::<_, i64>(4)?.max(0) as u64,
            bytes_total: r.get::<_, Option<i64>>(5)?.map(|b| b.max(0) as u64),
        },
        error: error.and_then(|e| serde_json::from_str(&e).ok()),
        result: result.and_then(|e| serde_json::from_str(&e).ok()),
        created_at: rfc3339(r.get(8)?),
        updated_at: rfc3339(r.get(9)?),
    })
}

/// Records a new running import, and forgets the oldest finished operations beyond
/// [`KEEP_OPERATIONS`].
pub(super) fn insert_op(
    conn: &Db,
    id: &str,
    name: &str,
    request: &str,
    node: Option<&str>,
) -> Result<Option<Operation>> {
    let tx = conn.transaction()?;
    let now = now();
    tx.execute(
        "INSERT INTO operations (id, kind, state, target, request, phase, created_at,
             updated_at, node) VALUES (?1, 'image-import', 'running', ?2, ?3, 'queued', ?4, ?4, ?5)",
        params![id, name, request, now, node],
    )?;
    tx.execute(
        "DELETE FROM operations WHERE state != 'running' AND id NOT IN
             (SELECT id FROM operations WHERE state != 'running'
              ORDER BY created_at DESC, id DESC LIMIT ?1)",
        [KEEP_OPERATIONS],
    )?;
    let op = get_op(&tx, id)?;
    tx.commit()?;
    Ok(op)
}

pub(super) fn get_op(conn: &Db, id: &str) -> Result<Option<Operation>> {
    Ok(conn
        .query_row(
            &format!("SELECT {OP_COLUMNS} FROM operations WHERE id = ?1"),
            [id],
            op_from_row,
        )
        .optional()?)
}

/// Ends an operation: its final state, progress, error or result.
pub(super) fn finish_op(
    conn: &Db,
    id: &str,
    progress: &OperationProgress,
    outcome: std::result::Result<&Image, &ErrorDetail>,
) -> Result<()> {
    let (state, error, result) = match outcome {
        Ok(img) => (
            OperationState::Succeeded,
            None,
            serde_json::to_string(img).ok(),
        ),
        Err(e) => (OperationState::Failed, serde_json::to_string(e).ok(), None),
    };
    conn.execute(
        "UPDATE operations SET state = ?2, phase = ?3, bytes_done = ?4, bytes_total = ?5,
             error = ?6, result = ?7, updated_at = ?8 WHERE id = ?1",
        params![
            id,
            state.as_str(),
            progress.phase,
            progress.bytes_done as i64,
            progress.bytes_total.map(|b| b as i64),
            error,
            result,
            now()
        ],
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn old_operations_are_pruned_and_interrupted_ones_failed() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::tests::open(&dir);
        store
            .blocking(|c| {
                let n = KEEP_OPERATIONS + 5;
                for i in 0..n {
                    let id = format!("op-{i}");
                    insert_op(c, &id, "img", "{}", None)?;
                    if i > 0 {
                        // All but the first end, so the first stays running.
                        let p = OperationProgress::default();
                        let e = ErrorDetail::new("import_failed", "x");
                        finish_op(c, &id, &p, Err(&e))?;
                    }
                }
                let count = |state: &str| -> i64 {
                    c.query_row(
                        "SELECT COUNT(*) FROM operations WHERE state = ?1",
                        [state],
                        |r| r.get(0),
                    )
                    .unwrap()
                };
                // The last insert pruned down to KEEP finished ones before its own ended.
                assert_eq!(count("failed"), KEEP_OPERATIONS + 1);
                assert_eq!(count("running"), 1);
                assert!(
                    get_op(c, "op-1")?.is_none(),
                    "the oldest finished one is kept"
                );
                assert!(get_op(c, &format!("op-{}", n - 1))?.is_some());
                assert_eq!(recover(c, None)?, 1);
                let op = get_op(c, "op-0")?.unwrap();
                assert_eq!(op.state, OperationState::Failed);
                assert_eq!(op.error.unwrap().code, "interrupted");
                Ok(())
            })
            .unwrap();
    }
}
