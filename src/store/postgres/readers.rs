//! The reader connections: at most [`MAX_READERS`] open at once per
//! process, reused. A read that finds them all busy waits for one (up to
//! [`READER_WAIT`]) instead of opening another, so a burst of reads can
//! never exhaust the server's `max_connections`: with N processes the
//! readers hold at most N x [`MAX_READERS`] connections.
//!
//! Each reader keeps the statements it ran prepared ([`Reader`]): a query
//! given as text would otherwise be parsed, planned and closed again on
//! every call, a round trip more each time.

use std::{
    collections::HashMap,
    ops::{Deref, DerefMut},
    time::Duration,
};

use postgres::{Client, Row, Statement, types::ToSql};

use super::connect;
use crate::store::{Result, pool::Pool};

/// Reader connections one process opens at most.
pub(crate) const MAX_READERS: usize = 16;

/// How long a read waits for a busy reader before it fails.
const READER_WAIT: Duration = Duration::from_secs(30);

/// Statements a reader keeps prepared at most; past it, it starts over.
const MAX_STATEMENTS: usize = 64;

/// A reader connection and the statements prepared on it, by their text.
/// Its `query`, `query_one`, `query_opt` and `execute` take the text as
/// [`Client`]'s do and prepare it once per connection; everything else is
/// the [`Client`]'s.
pub(crate) struct Reader {
    client: Client,
    statements: HashMap<String, Statement>,
}

/// Parameters of a query.
type Params<'a> = &'a [&'a (dyn ToSql + Sync)];

impl Reader {
    fn new(client: Client) -> Self {
        Reader {
            client,
            statements: HashMap::new(),
        }
    }

    /// `sql`, prepared on this connection the first time.
    fn statement(&mut self, sql: &str) -> Result<Statement, postgres::Error> {
        if let Some(statement) = self.statements.get(sql) {
            return Ok(statement.clone());
        }
        if self.statements.len() >= MAX_STATEMENTS {
            self.statements.clear();
        }
        let statement = self.client.prepare(sql)?;
        self.statements.insert(sql.to_string(), statement.clone());
        Ok(statement)
    }

    pub(crate) fn query(
        &mut self,
        sql: &str,
        params: Params<'_>,
    ) -> Result<Vec<Row>, postgres::Error> {
        let statement = self.statement(sql)?;
        self.client.query(&statement, params)
    }

    pub(crate) fn query_one(
        &mut self,
        sql: &str,
        params: Params<'_>,
    ) -> Result<Row, postgres::Error> {
        let statement = self.statement(sql)?;
        self.client.query_one(&statement, params)
    }

    pub(crate) fn query_opt(
        &mut self,
        sql: &str,
        params: Params<'_>,
    ) -> Result<Option<Row>, postgres::Error> {
        let statement = self.statement(sql)?;
        self.client.query_opt(&statement, params)
    }

    pub(crate) fn execute(
        &mut self,
        sql: &str,
        params: Params<'_>,
    ) -> Result<u64, postgres::Error> {
        let statement = self.statement(sql)?;
        self.client.execute(&statement, params)
    }
}

impl Deref for Reader {
    type Target = Client;

    fn deref(&self) -> &Client {
        &self.client
    }
}

impl DerefMut for Reader {
    fn deref_mut(&mut self) -> &mut Client {
        &mut self.client
    }
}

/// See the module doc.
pub(super) struct Readers {
    url: String,
    pool: Pool<Reader>,
}

impl Readers {
    pub(super) fn new(url: &str) -> Self {
        Readers {
            url: url.to_string(),
            pool: Pool::new(MAX_READERS, READER_WAIT),
        }
    }

    /// Runs `f` on a reader (see [`Pool::acquire`]); once more on a fresh
    /// connection when a pooled one turns out closed (a database restart,
    /// an idle timeout).
    pub(super) fn with<T>(&self, f: impl Fn(&mut Reader) -> Result<T>) -> Result<T> {
        let (mut client, pooled) = self.pool.acquire(
            |client| !client.is_closed(),
            || connect(&self.url).map(Reader::new),
        )?;
        let mut result = f(&mut client);
        if result.is_err() && pooled && client.is_closed() {
            match connect(&self.url) {
                Ok(fresh) => {
                    client = Reader::new(fresh);
                    result = f(&mut client);
                }
                Err(err) => {
                    self.pool.release(client, false);
                    return Err(err);
                }
            }
        }
        let keep = !client.is_closed();
        self.pool.release(client, keep);
        result
    }

    /// Closes the idle readers.
    pub(super) fn close(&self) {
        self.pool.close();
    }
}
