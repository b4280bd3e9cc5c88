//! One HTTP/1.1 request read from the front of a byte buffer, sans-IO: bytes in, a parsed request,
//! "need more bytes" or a rejection with its status out. The server (server.rs) does the I/O.
//!
//! The framing rules are strict on purpose, so that no two parsers on a request's path can read
//! its length differently (request smuggling, RFC 9112 section 11.2):
//! - `Content-Length` is `1*DIGIT` and nothing else: no sign, no inner spaces, no comma lists.
//!   Several `Content-Length` fields are accepted only when all carry the same value (RFC 9112
//!   section 6.3, RFC 9110 section 8.6); anything else is 400.
//! - `Transfer-Encoding` of any kind is 501: bodies are framed by `Content-Length` only.
//! - `Connection` is a comma-separated, case-insensitive token list (RFC 9110 section 7.6.1):
//!   `close` anywhere closes; `keep-alive` keeps an HTTP/1.0 connection open.

/// Longest request line plus headers.
pub const MAX_HEAD: usize = 8 * 1024;
/// Most header fields.
pub const MAX_HEADERS: usize = 32;
/// Longest request body.
pub const MAX_BODY: usize = 64 * 1024;

/// The request line and the header fields the endpoints use, with the body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head<'a> {
    pub method: &'a str,
    /// The target up to `?`.
    pub path: &'a str,
    /// The target after `?`, empty when there is none.
    pub query: &'a str,
    pub content_type: Option<&'a str>,
    pub authorization: Option<&'a str>,
    /// The request body (`Content-Length` bytes after the head).
    pub body: &'a [u8],
    /// Close the connection after the reply (`Connection: close`, or HTTP/1.0 without keep-alive).
    pub close: bool,
    /// A HEAD request: answer with the headers of a GET and no body.
    pub head_only: bool,
}

/// What the front of a buffer holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parse<'a> {
    /// The head or the body is still incomplete and within the limits: read more bytes.
    Partial,
    /// One whole request; `len` is the bytes it takes (head and body).
    Complete { head: Head<'a>, len: usize },
    /// An unusable request: answer `status` with `message`, then close the connection.
    Reject { status: u16, message: &'static str },
}

const fn reject<'a>(status: u16, message: &'static str) -> Parse<'a> {
    Parse::Reject { status, message }
}

/// Parses the request at the front of `input`. Never panics; `len` never exceeds `input.len()`.
pub fn parse(input: &[u8]) -> Parse<'_> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut fields);
    // Only the first MAX_HEAD bytes can hold a head we accept: a head still incomplete there is
    // too long, wherever it ends.
    let window = &input[..input.len().min(MAX_HEAD)];
    let head_len = match request.parse(window) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if input.len() < MAX_HEAD => return Parse::Partial,
        Ok(httparse::Status::Partial) => {
            return reject(431, "the request line and headers exceed 8 KiB")
        }
        Err(httparse::Error::TooManyHeaders) => return reject(431, "more than 32 header fields"),
        Err(_) => return reject(400, "malformed request"),
    };
    let fields = match Fields::read(request.headers, request.version == Some(0)) {
        Ok(fields) => fields,
        Err(rejected) => return rejected,
    };
    // The limit is checked before the body arrives: nobody waits for 64 KiB we would refuse.
    if fields.content_length > MAX_BODY as u64 {
        return reject(413, "the request body exceeds 64 KiB");
    }
    let len = head_len + fields.content_length as usize;
    let Some(body) = input.get(head_len..len) else {
        return Parse::Partial;
    };
    let method = request.method.unwrap_or("");
    let target = request.path.unwrap_or("/");
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let head = Head {
        method,
        path,
        query,
        content_type: fields.content_type,
        authorization: fields.authorization,
        body,
        close: fields.close,
        head_only: method == "HEAD",
    };
    Parse::Complete { head, len }
}

/// The header fields that matter, read from all of a request's fields.
struct Fields<'a> {
    content_length: u64,
    content_type: Option<&'a str>,
    authorization: Option<&'a str>,
    close: bool,
}

impl<'a> Fields<'a> {
    fn read(headers: &[httparse::Header<'a>], http10: bool) -> Result<Fields<'a>, Parse<'a>> {
        let mut content_length: Option<u64> = None;
        let mut fields = Fields {
            content_length: 0,
            content_type: None,
            authorization: None,
            close: http10,
        };
        let (mut saw_close, mut saw_keep_alive) = (false, false);
        for h in headers {
            let name = h.name;
            if name.eq_ignore_ascii_case("content-length") {
                let Some(n) = content_length_value(h.value) else {
                    return Err(reject(400, "Content-Length must be a decimal number"));
                };
                if content_length.is_some_and(|previous| previous != n) {
                    return Err(reject(400, "conflicting Content-Length fields"));
                }
                content_length = Some(n);
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                return Err(reject(
                    501,
                    "chunked request bodies are not supported: send Content-Length",
                ));
            } else if name.eq_ignore_ascii_case("connection") {
                for token in h.value.split(|&b| b == b',').map(trim_ows) {
                    saw_close |= token.eq_ignore_ascii_case(b"close");
                    saw_keep_alive |= token.eq_ignore_ascii_case(b"keep-alive");
                }
            } else if name.eq_ignore_ascii_case("content-type") {
                fields.content_type = std::str::from_utf8(h.value).ok();
            } else if name.eq_ignore_ascii_case("authorization") {
                fields.authorization = std::str::from_utf8(h.value).ok();
            }
        }
        fields.content_length = content_length.unwrap_or(0);
        // `close` wins over everything; `keep-alive` only matters where closing is the default.
        fields.close = saw_close || (http10 && !saw_keep_alive);
        Ok(fields)
    }
}

/// A `Content-Length` value: `1*DIGIT` between optional whitespace. Values beyond u64 saturate
/// (they are over the body limit either way). None for anything else.
fn content_length_value(value: &[u8]) -> Option<u64> {
    let digits = trim_ows(value);
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(digits.iter().fold(0u64, |n, &d| {
        n.saturating_mul(10).saturating_add(u64::from(d - b'0'))
    }))
}

/// Strips optional whitespace (spaces and tabs, RFC 9110 section 5.6.3) from both ends.
fn trim_ows(bytes: &[u8]) -> &[u8] {
    let is_ows = |b: &u8| *b == b' ' || *b == b'\t';
    let start = bytes.iter().position(|b| !is_ows(b)).unwrap_or(bytes.len());
    let end = bytes
        .iter()
        .rposition(|b| !is_ows(b))
        .map_or(start, |i| i + 1);
    &bytes[start..end]
}

#[cfg(test)]
mod test {
    use super::*;

    fn complete(input: &[u8]) -> (Head<'_>, usize) {
        match parse(input) {
            Parse::Complete { head, len } => (head, len),
            other => panic!("expected a complete request, got {other:?}"),
        }
    }

    fn status(input: &[u8]) -> u16 {
        match parse(input) {
            Parse::Reject { status, .. } => status,
            other => panic!("expected a rejection, got {other:?}"),
        }
    }

    #[test]
    fn get_with_query() {
        let input = b"GET /debug/pprof/profile?seconds=1 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer t\r\n\r\n";
        let (head, len) = complete(input);
        assert_eq!(len, input.len());
        assert_eq!(
            head,
            Head {
                method: "GET",
                path: "/debug/pprof/profile",
                query: "seconds=1",
                content_type: None,
                authorization: Some("Bearer t"),
                body: b"",
                close: false,
                head_only: false,
            }
        );
    }

    #[test]
    fn post_with_body_then_the_next_request() {
        let input = b"POST /counter HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: 5\r\n\r\n{\"a\"}GET / HTTP/1.1\r\n\r\n";
        let (head, len) = complete(input);
        assert_eq!((head.method, head.body), ("POST", &b"{\"a\"}"[..]));
        assert_eq!(head.content_type, Some("application/json"));
        assert_eq!(&input[len..], b"GET / HTTP/1.1\r\n\r\n");
    }

    #[test]
    fn partial_head_and_partial_body() {
        assert_eq!(parse(b""), Parse::Partial);
        assert_eq!(parse(b"GET /coun"), Parse::Partial);
        assert_eq!(
            parse(b"POST / HTTP/1.1\r\nContent-Length: 4\r\n\r\nabc"),
            Parse::Partial
        );
    }

    #[test]
    fn head_is_head_only() {
        let (head, _) = complete(b"HEAD /healthz HTTP/1.1\r\n\r\n");
        assert!(head.head_only);
    }

    #[test]
    fn two_different_content_lengths_are_rejected() {
        // The smuggling case: one reader frames a body of 39 bytes, another a body of 0 bytes
        // followed by a second request.
        let input = b"GET /counter HTTP/1.1\r\nContent-Length: 39\r\nContent-Length: 0\r\n\r\nPOST /counter HTTP/1.1\r\nContent-Length: 0\r\n\r\n";
        assert_eq!(status(input), 400);
        assert_eq!(
            status(b"GET / HTTP/1.1\r\nContent-Length: 0\r\ncontent-length: 1\r\n\r\nx"),
            400
        );
    }

    #[test]
    fn identical_content_lengths_are_one() {
        let input = b"POST / HTTP/1.1\r\nContent-Length: 2\r\ncontent-length: 2\r\n\r\nabX";
        let (head, len) = complete(input);
        assert_eq!((head.body, len), (&b"ab"[..], input.len() - 1));
    }

    #[test]
    fn content_length_is_digits_only() {
        for value in [
            "+15", "-1", "1 5", "5, 5", "5,5", "0x10", "", "1.0", "\u{663}", "5;", "1e3",
        ] {
            let input = format!("POST / HTTP/1.1\r\nContent-Length: {value}\r\n\r\n");
            assert_eq!(status(input.as_bytes()), 400, "Content-Length: {value:?}");
        }
        // Surrounding whitespace is optional whitespace, not part of the value.
        let (head, _) = complete(b"POST / HTTP/1.1\r\nContent-Length: \t3 \r\n\r\nabc");
        assert_eq!(head.body, b"abc");
        // Leading zeros are still digits.
        let (head, _) = complete(b"POST / HTTP/1.1\r\nContent-Length: 003\r\n\r\nabc");
        assert_eq!(head.body, b"abc");
    }

    #[test]
    fn body_limit_is_checked_before_the_body_arrives() {
        assert_eq!(
            status(b"POST / HTTP/1.1\r\nContent-Length: 65537\r\n\r\n"),
            413
        );
        assert_eq!(
            status(b"POST / HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n"),
            413
        );
        assert_eq!(
            parse(b"POST / HTTP/1.1\r\nContent-Length: 65536\r\n\r\n"),
            Parse::Partial
        );
    }

    #[test]
    fn transfer_encoding_is_not_supported() {
        assert_eq!(
            status(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"),
            501
        );
        assert_eq!(
            status(
                b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: identity\r\n\r\nabc"
            ),
            501
        );
    }

    #[test]
    fn connection_is_a_token_list() {
        let close = |input: &[u8]| complete(input).0.close;
        assert!(close(
            b"GET / HTTP/1.1\r\nConnection: Upgrade, close\r\n\r\n"
        ));
        assert!(close(b"GET / HTTP/1.1\r\nConnection: CLOSE\r\n\r\n"));
        assert!(close(
            b"GET / HTTP/1.1\r\nConnection: keep-alive\r\nConnection: close\r\n\r\n"
        ));
        assert!(close(
            b"GET / HTTP/1.1\r\nConnection: keep-alive ,\tclose\r\n\r\n"
        ));
        assert!(!close(b"GET / HTTP/1.1\r\nConnection: Upgrade\r\n\r\n"));
        assert!(!close(
            b"GET / HTTP/1.1\r\nConnection: closed, xclose\r\n\r\n"
        ));
        assert!(!close(b"GET / HTTP/1.1\r\n\r\n"));
        // HTTP/1.0 closes unless the client asks to keep the connection.
        assert!(close(b"GET / HTTP/1.0\r\n\r\n"));
        assert!(!close(
            b"GET / HTTP/1.0\r\nConnection: TE, Keep-Alive\r\n\r\n"
        ));
        assert!(close(
            b"GET / HTTP/1.0\r\nConnection: keep-alive, close\r\n\r\n"
        ));
    }

    #[test]
    fn head_limits() {
        let long = format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(MAX_HEAD));
        assert_eq!(status(long.as_bytes()), 431);
        // Still incomplete at the limit: too long, without waiting for the end.
        assert_eq!(status(&long.as_bytes()[..MAX_HEAD]), 431);
        assert_eq!(parse(&long.as_bytes()[..MAX_HEAD - 1]), Parse::Partial);
        let many: String = (0..=MAX_HEADERS).map(|i| format!("X-{i}: y\r\n")).collect();
        assert_eq!(
            status(format!("GET / HTTP/1.1\r\n{many}\r\n").as_bytes()),
            431
        );
        let just: String = (0..MAX_HEADERS).map(|i| format!("X-{i}: y\r\n")).collect();
        complete(format!("GET / HTTP/1.1\r\n{just}\r\n").as_bytes());
    }

    #[test]
    fn malformed_is_400() {
        for input in [
            &b"GARBAGE\x01\x02 / HTTP/1.1\r\n\r\n"[..],
            b"GET / HTTP/2.0\r\n\r\n",
            b"GET / HTTP/1.1\r\nContent-Length : 5\r\n\r\nabcde",
            b"GET / HTTP/1.1\r\n folded: x\r\n\r\n",
            b"GET / HTTP/1.1\r\nX: a\x00b\r\n\r\n",
        ] {
            assert_eq!(status(input), 400, "{:?}", String::from_utf8_lossy(input));
        }
    }

    fn check_bounds(bytes: &[u8]) {
        if let Parse::Complete { head, len } = parse(bytes) {
            assert!(len <= bytes.len());
            assert!(head.body.len() <= len);
            assert_eq!(head.body, &bytes[len - head.body.len()..len]);
        }
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..2048)) {
            check_bounds(&bytes);
        }

        /// Real requests with a few bytes overwritten: the inputs that reach the header logic.
        #[test]
        fn mutated_requests_never_panic(
            seed in 0usize..4,
            edits in proptest::collection::vec((0usize..200, proptest::num::u8::ANY), 0..8),
            cut in 0usize..200,
        ) {
            let seeds: [&[u8]; 4] = [
                b"POST /counter HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: 16\r\n\r\n{\"increment\": 1}",
                b"GET /counter HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 5\r\nConnection: Upgrade, close\r\n\r\nhello",
                b"HEAD /healthz HTTP/1.0\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n",
                b"GET /debug/pprof/profile?seconds=1 HTTP/1.1\r\nAuthorization: Bearer t\r\n\r\n",
            ];
            let mut bytes = seeds[seed].to_vec();
            for (at, byte) in edits {
                let at = at % bytes.len();
                bytes[at] = byte;
            }
            bytes.truncate(cut.max(1));
            check_bounds(&bytes);
        }
    }
}
