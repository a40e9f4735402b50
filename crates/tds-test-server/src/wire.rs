//! The TDS 7.3/7.4 wire format as far as the test server speaks it (MS-TDS): packets, PRELOGIN,
//! LOGIN7, SQL batches, RPC requests (`sp_executesql`), bulk-load rows, and the response tokens
//! (LOGINACK, ENVCHANGE, COLMETADATA, ROW, DONE, ERROR). Written from the specification, not from
//! the client it serves, so the two are checked against each other.

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::engine::{Cell, Meta, SqlType};

pub const BATCH: u8 = 0x01;
pub const RPC: u8 = 0x03;
pub const REPLY: u8 = 0x04;
pub const ATTENTION: u8 = 0x06;
pub const BULK_LOAD: u8 = 0x07;
pub const TRANSACTION_MANAGER: u8 = 0x0E;
pub const LOGIN7: u8 = 0x10;
pub const PRELOGIN: u8 = 0x12;

const END_OF_MESSAGE: u8 = 0x01;
pub const PACKET_SIZE: usize = 4096;

/// One packet: its message type, whether it ends the message, and its payload.
pub struct Packet {
    pub kind: u8,
    pub last: bool,
    pub header: [u8; 8],
    pub payload: Vec<u8>,
}

pub async fn read_packet<R: AsyncRead + Unpin>(r: &mut R) -> io::Result<Packet> {
    let mut header = [0u8; 8];
    r.read_exact(&mut header).await?;
    let len = u16::from_be_bytes([header[2], header[3]]) as usize;
    if len < 8 {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "a TDS packet shorter than its header"));
    }
    let mut payload = vec![0u8; len - 8];
    r.read_exact(&mut payload).await?;
    Ok(Packet { kind: header[0], last: header[1] & END_OF_MESSAGE != 0, header, payload })
}

/// Reads the rest of a message whose first packet is `first`: its packets joined.
pub async fn read_rest<R: AsyncRead + Unpin>(r: &mut R, first: Packet) -> io::Result<Vec<u8>> {
    let mut payload = first.payload;
    let mut last = first.last;
    while !last {
        let p = read_packet(r).await?;
        payload.extend_from_slice(&p.payload);
        last = p.last;
    }
    Ok(payload)
}

/// Writes a message as packets of at most [`PACKET_SIZE`] bytes.
pub async fn write_message<W: AsyncWrite + Unpin>(w: &mut W, kind: u8, payload: &[u8]) -> io::Result<()> {
    let chunks: Vec<&[u8]> = if payload.is_empty() { vec![&[][..]] } else { payload.chunks(PACKET_SIZE - 8).collect() };
    let n = chunks.len();
    let mut out = Vec::with_capacity(payload.len() + 8 * n);
    for (i, chunk) in chunks.into_iter().enumerate() {
        let status = if i + 1 == n { END_OF_MESSAGE } else { 0 };
        out.push(kind);
        out.push(status);
        out.extend_from_slice(&((chunk.len() + 8) as u16).to_be_bytes());
        out.extend_from_slice(&[0, 0, ((i + 1) % 256) as u8, 0]);
        out.extend_from_slice(chunk);
    }
    w.write_all(&out).await?;
    w.flush().await
}

/// The PRELOGIN response: version, encryption not supported (this server speaks plain TDS),
/// no instance, thread id, no MARS.
pub fn prelogin_response() -> Vec<u8> {
    let options: [(u8, Vec<u8>); 5] = [
        (0x00, vec![15, 0, 0x07, 0xD0, 0, 0]), // VERSION 15.0.2000
        (0x01, vec![0x02]),                    // ENCRYPTION: ENCRYPT_NOT_SUP
        (0x02, vec![0x00]),                    // INSTOPT
        (0x03, vec![0, 0, 0, 0]),              // THREADID
        (0x04, vec![0x00]),                    // MARS off
    ];
    let mut offset = options.len() * 5 + 1;
    let mut head = Vec::new();
    let mut data = Vec::new();
    for (token, value) in &options {
        head.push(*token);
        head.extend_from_slice(&(offset as u16).to_be_bytes());
        head.extend_from_slice(&(value.len() as u16).to_be_bytes());
        offset += value.len();
        data.extend_from_slice(value);
    }
    head.push(0xFF);
    head.extend(data);
    head
}

/// The encryption a client asked for in its PRELOGIN (0 off, 1 on, 2 not supported, 3 required).
pub fn prelogin_encryption(payload: &[u8]) -> Option<u8> {
    let mut i = 0;
    while i + 5 <= payload.len() && payload[i] != 0xFF {
        let token = payload[i];
        let offset = u16::from_be_bytes([payload[i + 1], payload[i + 2]]) as usize;
        if token == 0x01 {
            return payload.get(offset).copied();
        }
        i += 5;
    }
    None
}

/// What a LOGIN7 carries that the server checks.
#[derive(Debug, Clone)]
pub struct Login {
    pub user: String,
    pub password: String,
    pub database: String,
    pub packet_size: u32,
}

fn utf16(bytes: &[u8]) -> String {
    let units: Vec<u16> = bytes.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect();
    String::from_utf16_lossy(&units)
}

pub fn parse_login(p: &[u8]) -> Login {
    let field = |at: usize| -> &[u8] {
        let offset = u16::from_le_bytes([p[at], p[at + 1]]) as usize;
        let chars = u16::from_le_bytes([p[at + 2], p[at + 3]]) as usize;
        &p[offset..offset + chars * 2]
    };
    // The password is obfuscated: each byte's nibbles swapped, then XORed with 0xA5.
    let password: Vec<u8> = field(44).iter().map(|b| (b ^ 0xA5).rotate_left(4)).collect();
    Login {
        packet_size: u32::from_le_bytes([p[8], p[9], p[10], p[11]]),
        user: utf16(field(40)),
        password: utf16(&password),
        database: utf16(field(68)),
    }
}

/// The text of a SQL batch (after its ALL_HEADERS).
pub fn batch_text(p: &[u8]) -> String {
    let headers = u32::from_le_bytes([p[0], p[1], p[2], p[3]]) as usize;
    utf16(&p[headers..])
}

/// A response under construction: a sequence of tokens.
#[derive(Default)]
pub struct Tokens(pub Vec<u8>);

fn b_varchar(s: &str, out: &mut Vec<u8>) {
    let units: Vec<u16> = s.encode_utf16().collect();
    out.push(units.len() as u8);
    for u in units {
        out.extend_from_slice(&u.to_le_bytes());
    }
}

fn us_varchar(s: &str, out: &mut Vec<u8>) {
    let units: Vec<u16> = s.encode_utf16().collect();
    out.extend_from_slice(&(units.len() as u16).to_le_bytes());
    for u in units {
        out.extend_from_slice(&u.to_le_bytes());
    }
}

/// The collation every string column reports: Latin1_General_100_CI_AS_SC_UTF8 (an `_UTF8`
/// collation, as the official client's check wants; LCID 0x0409, UTF-8 flag).
pub const COLLATION: [u8; 5] = [0x09, 0x04, 0xD0, 0x04, 0x34];

impl Tokens {
    pub fn login_ack(&mut self) {
        let mut body = vec![0x01]; // SQL interface
        body.extend_from_slice(&0x7400_0004u32.to_be_bytes()); // TDS 7.4
        b_varchar("dap-replica TDS test server", &mut body);
        body.extend_from_slice(&[15, 0, 0x07, 0xD0]);
        self.0.push(0xAD);
        self.0.extend_from_slice(&(body.len() as u16).to_le_bytes());
        self.0.extend(body);
    }

    /// ENVCHANGE of a string value (database 1, packet size 4).
    pub fn env_change(&mut self, kind: u8, new: &str, old: &str) {
        let mut body = vec![kind];
        b_varchar(new, &mut body);
        b_varchar(old, &mut body);
        self.0.push(0xE3);
        self.0.extend_from_slice(&(body.len() as u16).to_le_bytes());
        self.0.extend(body);
    }

    /// ENVCHANGE of the collation (7), as a login reports it.
    pub fn collation(&mut self) {
        let mut body = vec![7, COLLATION.len() as u8];
        body.extend_from_slice(&COLLATION);
        body.push(0);
        self.0.push(0xE3);
        self.0.extend_from_slice(&(body.len() as u16).to_le_bytes());
        self.0.extend(body);
    }

    /// ENVCHANGE of a transaction (8 begin, 9 commit, 10 rollback) with its descriptor.
    pub fn transaction(&mut self, kind: u8, descriptor: u64) {
        let (new, old): (Vec<u8>, Vec<u8>) = if kind == 8 {
            (descriptor.to_le_bytes().to_vec(), Vec::new())
        } else {
            (Vec::new(), descriptor.to_le_bytes().to_vec())
        };
        let mut body = vec![kind, new.len() as u8];
        body.extend(new);
        body.push(old.len() as u8);
        body.extend(old);
        self.0.push(0xE3);
        self.0.extend_from_slice(&(body.len() as u16).to_le_bytes());
        self.0.extend(body);
    }

    /// DONE (0xFD), DONEPROC (0xFE) or DONEINPROC (0xFF).
    pub fn done(&mut self, token: u8, more: bool, error: bool, count: Option<u64>) {
        let mut status = 0u16;
        if more {
            status |= 0x01;
        }
        if error {
            status |= 0x02;
        }
        if count.is_some() {
            status |= 0x10;
        }
        self.0.push(token);
        self.0.extend_from_slice(&status.to_le_bytes());
        self.0.extend_from_slice(&0u16.to_le_bytes());
        self.0.extend_from_slice(&count.unwrap_or(0).to_le_bytes());
    }

    pub fn error(&mut self, number: u32, message: &str) {
        let mut body = Vec::new();
        body.extend_from_slice(&number.to_le_bytes());
        body.push(1); // state
        body.push(16); // class: a user error
        us_varchar(message, &mut body);
        b_varchar("dap-tds-test", &mut body);
        b_varchar("", &mut body);
        body.extend_from_slice(&1u32.to_le_bytes());
        self.0.push(0xAA);
        self.0.extend_from_slice(&(body.len() as u16).to_le_bytes());
        self.0.extend(body);
    }

    /// COLMETADATA for result columns.
    pub fn col_metadata(&mut self, columns: &[(String, SqlType, Meta)]) {
        self.0.push(0x81);
        self.0.extend_from_slice(&(columns.len() as u16).to_le_bytes());
        for (name, ty, meta) in columns {
            self.0.extend_from_slice(&0u32.to_le_bytes()); // user type
            // Nullable; read/write, or read-only with the identity flag.
            let flags: u16 = if meta.nullable { 0x0001 } else { 0 } | if meta.identity { 0x0010 } else { 0x0004 };
            self.0.extend_from_slice(&flags.to_le_bytes());
            type_info(ty, &mut self.0);
            b_varchar(name, &mut self.0);
        }
    }

    pub fn row(&mut self, types: &[SqlType], cells: &[Cell]) {
        self.0.push(0xD1);
        for (ty, cell) in types.iter().zip(cells) {
            encode_value(ty, cell, &mut self.0);
        }
    }
}

/// TYPE_INFO of a column type: the nullable variable-length forms throughout.
fn type_info(ty: &SqlType, out: &mut Vec<u8>) {
    let max = |n: Option<u32>, unit: u32| -> u16 { n.map_or(0xFFFF, |n| (n * unit).min(8000) as u16) };
    match ty {
        SqlType::TinyInt => out.extend_from_slice(&[0x26, 1]),
        SqlType::SmallInt => out.extend_from_slice(&[0x26, 2]),
        SqlType::Int => out.extend_from_slice(&[0x26, 4]),
        SqlType::BigInt => out.extend_from_slice(&[0x26, 8]),
        SqlType::Bit => out.extend_from_slice(&[0x68, 1]),
        SqlType::Real => out.extend_from_slice(&[0x6D, 4]),
        SqlType::Float => out.extend_from_slice(&[0x6D, 8]),
        SqlType::Decimal(p, s) => out.extend_from_slice(&[0x6A, decimal_len(*p), *p, *s]),
        SqlType::VarChar(n) => {
            out.push(0xA7);
            out.extend_from_slice(&max(*n, 1).to_le_bytes());
            out.extend_from_slice(&COLLATION);
        }
        SqlType::NVarChar(n) => {
            out.push(0xE7);
            out.extend_from_slice(&max(*n, 2).to_le_bytes());
            out.extend_from_slice(&COLLATION);
        }
        SqlType::NText => {
            out.push(0x63);
            out.extend_from_slice(&0x7FFF_FFFFu32.to_le_bytes());
            out.extend_from_slice(&COLLATION);
            out.push(0); // no table name parts
        }
        SqlType::Binary(n) => {
            out.push(0xAD);
            out.extend_from_slice(&(*n as u16).to_le_bytes());
        }
        SqlType::VarBinary(n) => {
            out.push(0xA5);
            out.extend_from_slice(&max(*n, 1).to_le_bytes());
        }
        SqlType::DateTime2(scale) => out.extend_from_slice(&[0x2A, *scale]),
        SqlType::Date => out.push(0x28),
        SqlType::Time(scale) => out.extend_from_slice(&[0x29, *scale]),
    }
}

/// Bytes of a DECIMALN value of `precision` digits (after its sign byte, plus one).
pub fn decimal_len(precision: u8) -> u8 {
    match precision {
        0..=9 => 5,
        10..=19 => 9,
        20..=28 => 13,
        _ => 17,
    }
}

fn time_len(scale: u8) -> usize {
    match scale {
        0..=2 => 3,
        3..=4 => 4,
        _ => 5,
    }
}

/// Whether a type is sent as PLP (a `max` type).
fn is_plp(ty: &SqlType) -> bool {
    matches!(ty, SqlType::VarChar(None) | SqlType::NVarChar(None) | SqlType::VarBinary(None))
}

fn encode_value(ty: &SqlType, cell: &Cell, out: &mut Vec<u8>) {
    let bytes: Option<Vec<u8>> = match (ty, cell) {
        (_, Cell::Null) => None,
        (SqlType::TinyInt, c) => Some(vec![c.as_i64() as u8]),
        (SqlType::SmallInt, c) => Some((c.as_i64() as i16).to_le_bytes().to_vec()),
        (SqlType::Int, c) => Some((c.as_i64() as i32).to_le_bytes().to_vec()),
        (SqlType::BigInt, c) => Some(c.as_i64().to_le_bytes().to_vec()),
        (SqlType::Bit, c) => Some(vec![c.as_i64() as u8]),
        (SqlType::Real, c) => Some((c.as_f64() as f32).to_le_bytes().to_vec()),
        (SqlType::Float, c) => Some(c.as_f64().to_le_bytes().to_vec()),
        (SqlType::Decimal(p, s), c) => {
            let m = c.as_decimal(*s);
            let mut v = vec![if m < 0 { 0 } else { 1 }];
            v.extend_from_slice(&m.unsigned_abs().to_le_bytes()[..decimal_len(*p) as usize - 1]);
            Some(v)
        }
        (SqlType::VarChar(_), c) => Some(c.as_text().into_bytes()),
        (SqlType::NVarChar(_) | SqlType::NText, c) => {
            Some(c.as_text().encode_utf16().flat_map(u16::to_le_bytes).collect())
        }
        (SqlType::Binary(_) | SqlType::VarBinary(_), c) => Some(c.as_bytes()),
        (SqlType::DateTime2(scale), Cell::DateTime2(days, ticks)) => {
            let mut v = scaled_ticks(*ticks, *scale).to_le_bytes()[..time_len(*scale)].to_vec();
            v.extend_from_slice(&(*days as u32).to_le_bytes()[..3]);
            Some(v)
        }
        (SqlType::Date, Cell::Date(days)) => Some((*days as u32).to_le_bytes()[..3].to_vec()),
        (SqlType::Time(scale), Cell::Time(ticks)) => {
            Some(scaled_ticks(*ticks, *scale).to_le_bytes()[..time_len(*scale)].to_vec())
        }
        (ty, c) => panic!("the test server cannot send {c:?} as {ty:?}"),
    };
    if *ty == SqlType::NText {
        match bytes {
            None => out.push(0),
            Some(b) => {
                out.push(16);
                out.extend_from_slice(&[0; 24]); // text pointer and timestamp
                out.extend_from_slice(&(b.len() as u32).to_le_bytes());
                out.extend_from_slice(&b);
            }
        }
        return;
    }
    if is_plp(ty) {
        match bytes {
            None => out.extend_from_slice(&u64::MAX.to_le_bytes()),
            Some(b) => {
                out.extend_from_slice(&(b.len() as u64).to_le_bytes());
                if !b.is_empty() {
                    out.extend_from_slice(&(b.len() as u32).to_le_bytes());
                    out.extend_from_slice(&b);
                }
                out.extend_from_slice(&0u32.to_le_bytes());
            }
        }
        return;
    }
    match ty {
        SqlType::VarChar(_) | SqlType::NVarChar(_) | SqlType::Binary(_) | SqlType::VarBinary(_) => match bytes {
            None => out.extend_from_slice(&0xFFFFu16.to_le_bytes()),
            Some(b) => {
                out.extend_from_slice(&(b.len() as u16).to_le_bytes());
                out.extend_from_slice(&b);
            }
        },
        _ => match bytes {
            None => out.push(0),
            Some(b) => {
                out.push(b.len() as u8);
                out.extend_from_slice(&b);
            }
        },
    }
}

/// 100-nanosecond ticks as units of the scale (10^-scale seconds).
fn scaled_ticks(ticks: u64, scale: u8) -> u64 {
    ticks / 10u64.pow(7 - scale.min(7) as u32)
}

/// A reader over a message payload.
pub struct Reader<'a> {
    pub buf: &'a [u8],
    pub at: usize,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Reader<'a> {
        Reader { buf, at: 0 }
    }

    pub fn done(&self) -> bool {
        self.at >= self.buf.len()
    }

    pub fn bytes(&mut self, n: usize) -> io::Result<&'a [u8]> {
        let end = self.at + n;
        if end > self.buf.len() {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "a TDS message ends early"));
        }
        let b = &self.buf[self.at..end];
        self.at = end;
        Ok(b)
    }

    pub fn u8(&mut self) -> io::Result<u8> {
        Ok(self.bytes(1)?[0])
    }

    pub fn u16(&mut self) -> io::Result<u16> {
        let b = self.bytes(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    pub fn u32(&mut self) -> io::Result<u32> {
        let b = self.bytes(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub fn u64(&mut self) -> io::Result<u64> {
        let b = self.bytes(8)?;
        Ok(u64::from_le_bytes(b.try_into().expect("eight bytes")))
    }

    pub fn b_varchar(&mut self) -> io::Result<String> {
        let n = self.u8()? as usize;
        Ok(utf16(self.bytes(n * 2)?))
    }

    /// A TYPE_INFO, as a column type.
    pub fn type_info(&mut self) -> io::Result<SqlType> {
        let kind = self.u8()?;
        let bad = || io::Error::new(io::ErrorKind::InvalidData, format!("TYPE_INFO 0x{kind:02x} is not supported"));
        Ok(match kind {
            0x26 => match self.u8()? {
                1 => SqlType::TinyInt,
                2 => SqlType::SmallInt,
                4 => SqlType::Int,
                _ => SqlType::BigInt,
            },
            0x30 => SqlType::TinyInt,
            0x34 => SqlType::SmallInt,
            0x38 => SqlType::Int,
            0x7F => SqlType::BigInt,
            0x32 => SqlType::Bit,
            0x68 => {
                self.u8()?;
                SqlType::Bit
            }
            0x3B => SqlType::Real,
            0x3E => SqlType::Float,
            0x6D => {
                if self.u8()? == 4 {
                    SqlType::Real
                } else {
                    SqlType::Float
                }
            }
            0x6A | 0x6C => {
                self.u8()?;
                let (p, s) = (self.u8()?, self.u8()?);
                SqlType::Decimal(p, s)
            }
            0xA7 | 0xAF | 0xE7 | 0xEF => {
                let len = self.u16()?;
                self.bytes(5)?;
                let n = (len != 0xFFFF).then_some(if kind >= 0xE7 { len as u32 / 2 } else { len as u32 });
                if kind >= 0xE7 { SqlType::NVarChar(n) } else { SqlType::VarChar(n) }
            }
            0xAD | 0xA5 => {
                let len = self.u16()?;
                if kind == 0xAD {
                    SqlType::Binary(len as u32)
                } else {
                    SqlType::VarBinary((len != 0xFFFF).then_some(len as u32))
                }
            }
            0x24 => {
                self.u8()?;
                SqlType::Binary(16)
            }
            0x63 => {
                self.u32()?;
                self.bytes(5)?; // collation
                let n = self.u16()? as usize; // the table name, one US_VARCHAR in a bulk load
                self.bytes(n * 2)?;
                SqlType::NText
            }
            0x2A => SqlType::DateTime2(self.u8()?),
            0x28 => SqlType::Date,
            0x29 => SqlType::Time(self.u8()?),
            _ => return Err(bad()),
        })
    }

    /// A value of type `ty` (the type's nullable wire form, as in ROW tokens and RPC parameters).
    pub fn value(&mut self, ty: &SqlType) -> io::Result<Cell> {
        if *ty == SqlType::NText {
            let pointer = self.u8()? as usize;
            if pointer == 0 {
                return Ok(Cell::Null);
            }
            self.bytes(pointer + 8)?; // text pointer and timestamp
            let n = self.u32()? as usize;
            return Ok(Cell::Text(utf16(self.bytes(n)?)));
        }
        if is_plp(ty) {
            let total = self.u64()?;
            if total == u64::MAX {
                return Ok(Cell::Null);
            }
            let mut data = Vec::new();
            loop {
                let n = self.u32()? as usize;
                if n == 0 {
                    break;
                }
                data.extend_from_slice(self.bytes(n)?);
            }
            return Ok(bytes_cell(ty, &data));
        }
        match ty {
            SqlType::VarChar(_) | SqlType::NVarChar(_) | SqlType::Binary(_) | SqlType::VarBinary(_) => {
                let n = self.u16()?;
                if n == 0xFFFF {
                    return Ok(Cell::Null);
                }
                let data = self.bytes(n as usize)?;
                Ok(bytes_cell(ty, data))
            }
            _ => {
                let n = self.u8()? as usize;
                if n == 0 {
                    return Ok(Cell::Null);
                }
                let b = self.bytes(n)?;
                let mut le = [0u8; 16];
                le[..n.min(16)].copy_from_slice(&b[..n.min(16)]);
                Ok(match ty {
                    SqlType::TinyInt => Cell::Int(b[0] as i64),
                    SqlType::SmallInt => Cell::Int(i16::from_le_bytes([b[0], b[1]]) as i64),
                    SqlType::Int => Cell::Int(i32::from_le_bytes(b.try_into().unwrap()) as i64),
                    SqlType::BigInt => Cell::Int(i64::from_le_bytes(b.try_into().unwrap())),
                    SqlType::Bit => Cell::Bit(b[0] != 0),
                    SqlType::Real => Cell::Float(f32::from_le_bytes(b.try_into().unwrap()) as f64),
                    SqlType::Float => Cell::Float(f64::from_le_bytes(b.try_into().unwrap())),
                    SqlType::Decimal(_, s) => {
                        let mut m = [0u8; 16];
                        m[..n - 1].copy_from_slice(&b[1..]);
                        let magnitude = i128::from_le_bytes(m);
                        Cell::Decimal(if b[0] == 1 { magnitude } else { -magnitude }, *s)
                    }
                    SqlType::DateTime2(scale) => {
                        let t = time_len(*scale);
                        let mut ticks = [0u8; 8];
                        ticks[..t].copy_from_slice(&b[..t]);
                        let mut days = [0u8; 4];
                        days[..3].copy_from_slice(&b[t..t + 3]);
                        Cell::DateTime2(
                            u32::from_le_bytes(days) as i64,
                            u64::from_le_bytes(ticks) * 10u64.pow(7 - (*scale).min(7) as u32),
                        )
                    }
                    SqlType::Date => Cell::Date(u32::from_le_bytes([b[0], b[1], b[2], 0]) as i64),
                    SqlType::Time(scale) => {
                        let mut ticks = [0u8; 8];
                        ticks[..n].copy_from_slice(b);
                        Cell::Time(u64::from_le_bytes(ticks) * 10u64.pow(7 - (*scale).min(7) as u32))
                    }
                    other => {
                        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("no value form for {other:?}")));
                    }
                })
            }
        }
    }
}

fn bytes_cell(ty: &SqlType, data: &[u8]) -> Cell {
    match ty {
        SqlType::NVarChar(_) => Cell::Text(utf16(data)),
        SqlType::VarChar(_) => Cell::Text(String::from_utf8_lossy(data).into_owned()),
        _ => Cell::Binary(data.to_vec()),
    }
}

/// An RPC request to `sp_executesql`: its statement and parameter values by name.
pub fn parse_rpc(p: &[u8]) -> io::Result<(String, Vec<(String, Cell)>)> {
    let headers = u32::from_le_bytes([p[0], p[1], p[2], p[3]]) as usize;
    let mut r = Reader::new(&p[headers..]);
    let name_len = r.u16()?;
    if name_len == 0xFFFF {
        let proc_id = r.u16()?;
        if proc_id != 10 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("RPC to procedure {proc_id}: only sp_executesql (10) is served"),
            ));
        }
    } else {
        r.bytes(name_len as usize * 2)?;
    }
    r.u16()?; // option flags
    let mut params = Vec::new();
    while !r.done() {
        let name = r.b_varchar()?;
        r.u8()?; // status
        let ty = r.type_info()?;
        params.push((name, r.value(&ty)?));
    }
    let statement = match params.first() {
        Some((_, Cell::Text(s))) => s.clone(),
        _ => return Err(io::Error::new(io::ErrorKind::InvalidData, "sp_executesql without its statement")),
    };
    // The second parameter declares the others; their values follow, named @P1, @P2, …
    Ok((statement, params.into_iter().skip(2).collect()))
}

/// One token of a bulk-load stream.
#[derive(Debug)]
pub enum BulkToken {
    Columns(Vec<(String, SqlType)>),
    Row(Vec<Cell>),
    Done,
}

/// Decodes bulk-load tokens as their bytes arrive, packet by packet: memory stays bounded
/// however many rows a load carries.
#[derive(Default)]
pub struct BulkDecoder {
    buf: Vec<u8>,
    at: usize,
    columns: Vec<(String, SqlType)>,
}

impl BulkDecoder {
    pub fn push(&mut self, bytes: &[u8]) {
        if self.at > 1 << 20 {
            self.buf.drain(..self.at);
            self.at = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete token, or `None` until more bytes arrive.
    pub fn next_token(&mut self) -> io::Result<Option<BulkToken>> {
        let mut r = Reader::new(&self.buf[self.at..]);
        let result = (|| -> io::Result<BulkToken> {
            match r.u8()? {
                0x81 => {
                    let n = r.u16()?;
                    let mut columns = Vec::new();
                    for _ in 0..n {
                        r.u32()?; // user type
                        r.u16()?; // flags
                        let ty = r.type_info()?;
                        columns.push((r.b_varchar()?, ty));
                    }
                    Ok(BulkToken::Columns(columns))
                }
                0xD1 => Ok(BulkToken::Row(
                    self.columns.iter().map(|(_, ty)| r.value(ty)).collect::<io::Result<Vec<Cell>>>()?,
                )),
                0xFD => {
                    r.bytes(12)?;
                    Ok(BulkToken::Done)
                }
                other => Err(io::Error::new(io::ErrorKind::InvalidData, format!("bulk token 0x{other:02x}"))),
            }
        })();
        match result {
            Ok(token) => {
                self.at += r.at;
                if let BulkToken::Columns(c) = &token {
                    self.columns = c.clone();
                }
                Ok(Some(token))
            }
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(None),
            Err(e) => Err(e),
        }
    }
}
