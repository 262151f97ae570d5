//! A real, tiny SMTP server for tests: the mail sink that email notifications are sent to.
//!
//! [`SmtpSink::start`] binds `127.0.0.1:0` and speaks enough RFC 5321 for an ordinary client
//! (lettre): the `220` greeting, `EHLO`/`HELO`, `MAIL FROM`, `RCPT TO`, `DATA` (ending at a
//! lone `.`, with dot-unstuffing), `RSET`, `NOOP`, `VRFY`, `QUIT`, and `AUTH PLAIN`/`LOGIN`
//! (any credentials are accepted and the user name is recorded). It offers no STARTTLS and
//! does not relay anything: each message (envelope + raw data) is kept in memory for
//! assertions. Sessions run until the client quits or the sink is dropped.
//!
//! Limits keep a misbehaving client from eating memory: 64 KiB per line, 10 MiB per message.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::task::{JoinHandle, JoinSet};

use crate::TestkitError;

const MAX_LINE: u64 = 64 * 1024;
const MAX_MESSAGE: usize = 10 * 1024 * 1024;

/// One message as the sink received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceivedMessage {
    /// The name given in `EHLO`/`HELO`.
    pub helo: Option<String>,
    /// The user name from `AUTH`, if the client authenticated.
    pub auth_user: Option<String>,
    /// The reverse path of `MAIL FROM:<…>`.
    pub mail_from: String,
    /// The forward paths of each `RCPT TO:<…>`.
    pub rcpt_to: Vec<String>,
    /// The message (headers and body) after dot-unstuffing, lines joined with CRLF, without
    /// the terminating `.`.
    pub data: String,
}

impl ReceivedMessage {
    /// The first header `name` (case-insensitive), with folded lines joined.
    pub fn header(&self, name: &str) -> Option<String> {
        let mut found: Option<String> = None;
        for line in self.data.split("\r\n") {
            if line.is_empty() {
                break;
            }
            if let Some(value) = found.as_mut() {
                if line.starts_with(' ') || line.starts_with('\t') {
                    value.push(' ');
                    value.push_str(line.trim());
                    continue;
                }
                break;
            }
            if let Some((key, value)) = line.split_once(':') {
                if key.eq_ignore_ascii_case(name) {
                    found = Some(value.trim().to_owned());
                }
            }
        }
        found
    }

    /// Everything after the first empty line.
    pub fn body(&self) -> &str {
        self.data
            .split_once("\r\n\r\n")
            .map(|(_, body)| body)
            .unwrap_or("")
    }
}

#[derive(Debug, Default)]
struct Shared {
    messages: Mutex<Vec<ReceivedMessage>>,
    received: Notify,
}

impl Shared {
    fn messages(&self) -> Vec<ReceivedMessage> {
        self.messages
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// A running SMTP sink; stops (closing open sessions) when dropped.
#[derive(Debug)]
pub struct SmtpSink {
    /// Where it listens: `127.0.0.1:<port>`.
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl SmtpSink {
    /// Binds `127.0.0.1:0` and starts accepting sessions.
    pub async fn start() -> Result<Self, TestkitError> {
        let listener =
            TcpListener::bind("127.0.0.1:0")
                .await
                .map_err(|source| TestkitError::Io {
                    action: "binding the SMTP sink".into(),
                    source,
                })?;
        let addr = listener.local_addr().map_err(|source| TestkitError::Io {
            action: "reading the SMTP sink's address".into(),
            source,
        })?;
        let shared = Arc::new(Shared::default());
        let task = tokio::spawn(accept_loop(listener, shared.clone()));
        Ok(Self { addr, shared, task })
    }

    /// Every message received so far, oldest first.
    pub fn messages(&self) -> Vec<ReceivedMessage> {
        self.shared.messages()
    }

    /// Waits until at least `count` messages arrived, or fails after `timeout`.
    pub async fn wait_for_messages(
        &self,
        count: usize,
        timeout: Duration,
    ) -> Result<Vec<ReceivedMessage>, TestkitError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            // Register interest before checking, so a message arriving in between wakes us.
            let notified = self.shared.received.notified();
            let messages = self.shared.messages();
            if messages.len() >= count {
                return Ok(messages);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(TestkitError::Timeout {
                    what: format!("{count} message(s) arriving at the SMTP sink"),
                    seconds: timeout.as_secs(),
                    detail: format!(" (got {})", self.shared.messages().len()),
                });
            }
        }
    }
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    // Sessions live in this set: aborting the accept task drops it and ends them all.
    let mut sessions = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    sessions.spawn(session(stream, shared.clone()));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "smtp sink: accept failed");
                }
            },
            Some(finished) = sessions.join_next() => {
                if let Ok(Err(e)) = finished {
                    tracing::debug!(error = %e, "smtp sink: session ended with an error");
                }
            }
        }
    }
}

#[derive(Debug, Default)]
struct Transaction {
    mail_from: Option<String>,
    rcpt_to: Vec<String>,
}

/// Reads one line (without CRLF/LF); `None` at end of stream. Errors on over-long lines.
async fn read_line<R: tokio::io::AsyncBufRead + Unpin>(
    reader: &mut R,
) -> std::io::Result<Option<String>> {
    let mut buf = Vec::new();
    let n = reader.take(MAX_LINE).read_until(b'\n', &mut buf).await?;
    if n == 0 {
        return Ok(None);
    }
    // A line without its newline is either over-long (an error) or the end of the stream
    // (taken as a line).
    if buf.last() != Some(&b'\n') && n as u64 >= MAX_LINE {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "line too long",
        ));
    }
    while matches!(buf.last(), Some(b'\n' | b'\r')) {
        buf.pop();
    }
    Ok(Some(String::from_utf8_lossy(&buf).into_owned()))
}

/// The address inside `FROM:<addr> PARAMS` / `TO:<addr>`.
fn path_argument(arg: &str, prefix: &str) -> Option<String> {
    let head = arg.get(..prefix.len())?;
    if !head.eq_ignore_ascii_case(prefix) {
        return None;
    }
    let rest = arg[prefix.len()..].trim_start();
    if let Some(inner) = rest.strip_prefix('<') {
        inner.split_once('>').map(|(addr, _)| addr.to_owned())
    } else {
        rest.split_whitespace().next().map(str::to_owned)
    }
}

fn decode_b64(text: &str) -> String {
    BASE64
        .decode(text.trim())
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

async fn session(stream: TcpStream, shared: Arc<Shared>) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    write
        .write_all(b"220 payos-testkit ESMTP sink ready\r\n")
        .await?;
    let mut helo = None;
    let mut auth_user = None;
    let mut tx = Transaction::default();
    while let Some(line) = read_line(&mut reader).await? {
        let (verb, arg) = match line.split_once(' ') {
            Some((verb, arg)) => (verb.to_ascii_uppercase(), arg.trim().to_owned()),
            None => (line.trim().to_ascii_uppercase(), String::new()),
        };
        let reply: &[u8] = match verb.as_str() {
            "EHLO" => {
                helo = Some(arg);
                tx = Transaction::default();
                b"250-payos-testkit greets you\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n250-SIZE 10485760\r\n250-AUTH PLAIN LOGIN\r\n250 HELP\r\n"
            }
            "HELO" => {
                helo = Some(arg);
                tx = Transaction::default();
                b"250 payos-testkit\r\n"
            }
            "AUTH" => {
                let mut parts = arg.split_whitespace();
                let mechanism = parts.next().unwrap_or("").to_ascii_uppercase();
                let initial = parts.next().map(str::to_owned);
                match mechanism.as_str() {
                    "PLAIN" => {
                        let response = match initial {
                            Some(r) => r,
                            None => {
                                write.write_all(b"334 \r\n").await?;
                                read_line(&mut reader).await?.unwrap_or_default()
                            }
                        };
                        // authzid \0 authcid \0 password
                        let decoded = decode_b64(&response);
                        auth_user = decoded.split('\0').nth(1).map(str::to_owned);
                        b"235 2.7.0 Authentication successful\r\n"
                    }
                    "LOGIN" => {
                        write.write_all(b"334 VXNlcm5hbWU6\r\n").await?;
                        let user = read_line(&mut reader).await?.unwrap_or_default();
                        write.write_all(b"334 UGFzc3dvcmQ6\r\n").await?;
                        let _password = read_line(&mut reader).await?;
                        auth_user = Some(decode_b64(&user));
                        b"235 2.7.0 Authentication successful\r\n"
                    }
                    _ => b"504 5.5.4 Unrecognized authentication type\r\n",
                }
            }
            "MAIL" => match path_argument(&arg, "FROM:") {
                Some(from) => {
                    tx = Transaction {
                        mail_from: Some(from),
                        rcpt_to: Vec::new(),
                    };
                    b"250 2.1.0 OK\r\n"
                }
                None => b"501 5.5.4 Syntax: MAIL FROM:<address>\r\n",
            },
            "RCPT" => match (tx.mail_from.is_some(), path_argument(&arg, "TO:")) {
                (false, _) => b"503 5.5.1 Need MAIL first\r\n",
                (true, Some(to)) => {
                    tx.rcpt_to.push(to);
                    b"250 2.1.5 OK\r\n"
                }
                (true, None) => b"501 5.5.4 Syntax: RCPT TO:<address>\r\n",
            },
            "DATA" => {
                if tx.rcpt_to.is_empty() {
                    b"503 5.5.1 Need RCPT first\r\n"
                } else {
                    write
                        .write_all(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                        .await?;
                    let mut lines = Vec::new();
                    let mut size = 0usize;
                    loop {
                        let Some(line) = read_line(&mut reader).await? else {
                            return Ok(()); // client vanished mid-message: nothing stored
                        };
                        if line == "." {
                            break;
                        }
                        // Dot-unstuffing (RFC 5321 §4.5.2).
                        let line = line.strip_prefix('.').map(str::to_owned).unwrap_or(line);
                        size += line.len() + 2;
                        if size > MAX_MESSAGE {
                            write.write_all(b"552 5.3.4 Message too big\r\n").await?;
                            return Ok(());
                        }
                        lines.push(line);
                    }
                    let message = ReceivedMessage {
                        helo: helo.clone(),
                        auth_user: auth_user.clone(),
                        mail_from: tx.mail_from.take().unwrap_or_default(),
                        rcpt_to: std::mem::take(&mut tx.rcpt_to),
                        data: lines.join("\r\n"),
                    };
                    shared
                        .messages
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .push(message);
                    shared.received.notify_waiters();
                    b"250 2.0.0 OK queued\r\n"
                }
            }
            "RSET" => {
                tx = Transaction::default();
                b"250 2.0.0 OK\r\n"
            }
            "NOOP" => b"250 2.0.0 OK\r\n",
            "VRFY" => b"252 2.1.5 Cannot VRFY user\r\n",
            "QUIT" => {
                write.write_all(b"221 2.0.0 Bye\r\n").await?;
                return Ok(());
            }
            _ => b"500 5.5.2 Command not recognized\r\n",
        };
        write.write_all(reply).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn expect(reader: &mut (impl tokio::io::AsyncBufRead + Unpin), code: &str) -> String {
        let mut last;
        loop {
            last = read_line(reader).await.unwrap().expect("reply");
            assert!(last.starts_with(code), "expected {code}, got {last:?}");
            if last.as_bytes().get(3) != Some(&b'-') {
                return last;
            }
        }
    }

    #[tokio::test]
    async fn speaks_smtp_with_dot_unstuffing_and_rset() {
        let sink = SmtpSink::start().await.unwrap();
        let stream = TcpStream::connect(sink.addr).await.unwrap();
        let (read, mut write) = stream.into_split();
        let mut reader = BufReader::new(read);
        expect(&mut reader, "220").await;
        for (command, code) in [
            ("EHLO client.test", "250"),
            ("NOOP", "250"),
            ("RCPT TO:<early@example.com>", "503"),
            ("MAIL FROM:<dropped@example.com>", "250"),
            ("RSET", "250"),
            ("DATA", "503"),
            ("MAIL FROM:<from@example.com> BODY=8BITMIME", "250"),
            ("RCPT TO:<a@example.com>", "250"),
            ("rcpt to:<b@example.com>", "250"),
            ("DATA", "354"),
        ] {
            write
                .write_all(format!("{command}\r\n").as_bytes())
                .await
                .unwrap();
            expect(&mut reader, code).await;
        }
        write
            .write_all(b"Subject: hi\r\n\r\nline one\r\n..leading dot\r\n.\r\n")
            .await
            .unwrap();
        expect(&mut reader, "250").await;
        write.write_all(b"BOGUS\r\nQUIT\r\n").await.unwrap();
        expect(&mut reader, "500").await;
        expect(&mut reader, "221").await;

        let messages = sink
            .wait_for_messages(1, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(messages.len(), 1);
        let m = &messages[0];
        assert_eq!(m.helo.as_deref(), Some("client.test"));
        assert_eq!(m.mail_from, "from@example.com");
        assert_eq!(m.rcpt_to, ["a@example.com", "b@example.com"]);
        assert_eq!(m.header("subject").as_deref(), Some("hi"));
        assert_eq!(m.body(), "line one\r\n.leading dot");
    }

    #[tokio::test]
    async fn waiting_times_out_loudly() {
        let sink = SmtpSink::start().await.unwrap();
        let err = sink
            .wait_for_messages(1, Duration::from_millis(50))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("SMTP sink"), "{err}");
    }
}
