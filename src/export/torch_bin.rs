//! `pytorch_model.bin` without PyTorch: the zip serialization `torch.save` uses for a state dict
//! (PyTorch ≥ 1.6), written and read back for exactly the tensors an export holds.
//!
//! The file is a ZIP archive, every record stored (no compression), each record's data aligned
//! to [`ALIGN`] bytes with an extra field `FB` of `Z` padding as PyTorch's writer does, all
//! under one directory `<archive>/` (PyTorch uses the file's stem, `pytorch_model`):
//!
//! - `data.pkl`: a pickle (protocol 2) of a `collections.OrderedDict` name → tensor, each tensor
//!   `torch._utils._rebuild_tensor_v2(storage, 0, size, stride, False, OrderedDict())` with
//!   `storage` the persistent id `('storage', torch.FloatStorage | torch.HalfStorage, key,
//!   'cpu', numel)`: only the globals `torch.load(..., weights_only=True)` allows;
//! - `byteorder`: `little`;
//! - `data/<key>`: the storage, raw little-endian, contiguous row-major (keys `0`, `1`, ... in
//!   the dict's order, one storage per tensor, storage offset 0);
//! - `version`: `3\n`, the file format version `torch.save` writes.
//!
//! Not written: `.format_version` / `.storage_alignment` (recent PyTorch's; without them
//! `torch.load` reads every record through the central directory instead of computing offsets
//! from its own writer's layout) and `.data/serialization_id` (random in PyTorch; the file stays
//! a function of the weights). Local headers carry the CRC and sizes (no data descriptors), the
//! archive is plain ZIP (no zip64: at most 4 GiB). [`read`] parses such a file (and small
//! `torch.save` files of the same kind) back, checking every record's CRC-32.

use std::collections::HashMap;

use anyhow::{Context, Result, bail, ensure};

/// The file name transformers and MPCFormer look for.
pub const FILE: &str = "pytorch_model.bin";
/// The directory inside the archive (`torch.save` uses the file's stem).
pub const ARCHIVE: &str = "pytorch_model";
/// Alignment of every record's data, as PyTorch's writer aligns it.
pub const ALIGN: usize = 64;

const LOCAL: u32 = 0x0403_4b50;
const CENTRAL: u32 = 0x0201_4b50;
const END: u32 = 0x0605_4b50;
/// 1980-01-01 in MS-DOS date format (00:00:00), for every record.
const DOS_DATE: u16 = 0x21;

/// Storage type of a tensor: its element type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Storage {
    /// `torch.FloatStorage`, f32.
    Float,
    /// `torch.HalfStorage`, f16.
    Half,
}

impl Storage {
    pub fn class(self) -> &'static str {
        match self {
            Storage::Float => "FloatStorage",
            Storage::Half => "HalfStorage",
        }
    }

    pub fn elem_size(self) -> usize {
        match self {
            Storage::Float => 4,
            Storage::Half => 2,
        }
    }

    fn from_class(class: &str) -> Option<Self> {
        [Storage::Float, Storage::Half]
            .into_iter()
            .find(|s| s.class() == class)
    }

    pub fn from_safetensors(d: safetensors::Dtype) -> Option<Self> {
        match d {
            safetensors::Dtype::F32 => Some(Storage::Float),
            safetensors::Dtype::F16 => Some(Storage::Half),
            _ => None,
        }
    }

    pub fn safetensors(self) -> safetensors::Dtype {
        match self {
            Storage::Float => safetensors::Dtype::F32,
            Storage::Half => safetensors::Dtype::F16,
        }
    }
}

/// One tensor of a state dict: contiguous row-major little-endian `data`.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor<'a> {
    pub name: String,
    pub storage: Storage,
    pub shape: Vec<usize>,
    pub data: &'a [u8],
}

fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

fn row_major_strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

// ---- Writing ----

/// The bytes of `pytorch_model.bin` holding `tensors`, in this order.
pub fn write(tensors: &[Tensor<'_>]) -> Result<Vec<u8>> {
    let mut pkl = Pickle::default();
    pkl.op(0x80).byte(2); // PROTO 2
    pkl.ordered_dict();
    pkl.op(b'('); // MARK
    for (key, t) in tensors.iter().enumerate() {
        let n = numel(&t.shape);
        ensure!(
            t.data.len() == n * t.storage.elem_size(),
            "{}: {} bytes for shape {:?} of {}",
            t.name,
            t.data.len(),
            t.shape,
            t.storage.class()
        );
        pkl.str(&t.name);
        pkl.global("torch._utils", "_rebuild_tensor_v2");
        pkl.op(b'('); // the arguments
        pkl.op(b'('); // the persistent id
        pkl.str("storage");
        pkl.global("torch", t.storage.class());
        pkl.str(&key.to_string());
        pkl.str("cpu");
        pkl.int(n as u64);
        pkl.op(b't'); // TUPLE
        pkl.op(b'Q'); // BINPERSID
        pkl.int(0); // storage_offset
        pkl.tuple(&t.shape);
        pkl.tuple(&row_major_strides(&t.shape));
        pkl.op(0x89); // NEWFALSE: requires_grad
        pkl.ordered_dict(); // backward_hooks
        pkl.op(b't').op(b'R'); // TUPLE, REDUCE
    }
    pkl.op(b'u').op(b'.'); // SETITEMS, STOP

    let mut zip = ZipWriter::default();
    zip.record("data.pkl", &pkl.0)?;
    zip.record("byteorder", b"little")?;
    for (key, t) in tensors.iter().enumerate() {
        zip.record(&format!("data/{key}"), t.data)?;
    }
    zip.record("version", b"3\n")?;
    zip.finish()
}

/// A protocol-2 pickle, without memo (every reader accepts that).
#[derive(Default)]
struct Pickle(Vec<u8>);

impl Pickle {
    fn op(&mut self, op: u8) -> &mut Self {
        self.0.push(op);
        self
    }

    fn byte(&mut self, b: u8) -> &mut Self {
        self.0.push(b);
        self
    }

    fn global(&mut self, module: &str, name: &str) {
        self.0.push(b'c');
        self.0.extend_from_slice(format!("{module}\n{name}\n").as_bytes());
    }

    /// `collections.OrderedDict()`.
    fn ordered_dict(&mut self) {
        self.global("collections", "OrderedDict");
        self.op(b')').op(b'R'); // EMPTY_TUPLE, REDUCE
    }

    fn str(&mut self, s: &str) {
        self.0.push(b'X'); // BINUNICODE
        self.0.extend_from_slice(&(s.len() as u32).to_le_bytes());
        self.0.extend_from_slice(s.as_bytes());
    }

    /// A non-negative integer as Python's pickler writes it.
    fn int(&mut self, v: u64) {
        if v < 0x100 {
            self.op(b'K').byte(v as u8); // BININT1
        } else if v < 0x1_0000 {
            self.0.push(b'M'); // BININT2
            self.0.extend_from_slice(&(v as u16).to_le_bytes());
        } else if v <= i32::MAX as u64 {
            self.0.push(b'J'); // BININT
            self.0.extend_from_slice(&(v as i32).to_le_bytes());
        } else {
            // LONG1: little-endian two's complement, with a 0 byte if the top bit is set.
            let mut b = v.to_le_bytes().to_vec();
            while b.len() > 1 && b[b.len() - 1] == 0 && b[b.len() - 2] & 0x80 == 0 {
                b.pop();
            }
            self.op(0x8a).byte(b.len() as u8);
            self.0.extend_from_slice(&b);
        }
    }

    fn tuple(&mut self, items: &[usize]) {
        match items.len() {
            0 => {
                self.op(b')');
            }
            n @ 1..=3 => {
                for &i in items {
                    self.int(i as u64);
                }
                self.op(0x84 + n as u8); // TUPLE1, TUPLE2, TUPLE3
            }
            _ => {
                self.op(b'(');
                for &i in items {
                    self.int(i as u64);
                }
                self.op(b't');
            }
        }
    }
}

/// A stored ZIP archive with [`ALIGN`]-aligned record data, all under [`ARCHIVE`]`/`.
#[derive(Default)]
struct ZipWriter {
    out: Vec<u8>,
    central: Vec<u8>,
    count: usize,
}

fn u16_of(n: usize, what: &str) -> Result<u16> {
    u16::try_from(n).with_context(|| format!("{what} {n} does not fit a ZIP field"))
}

fn u32_of(n: usize, what: &str) -> Result<u32> {
    u32::try_from(n).with_context(|| {
        format!("{what} {n} is past 4 GiB: {FILE} without zip64 cannot hold it (--no-pytorch-bin)")
    })
}

impl ZipWriter {
    fn record(&mut self, name: &str, data: &[u8]) -> Result<()> {
        let name = format!("{ARCHIVE}/{name}");
        let offset = self.out.len();
        // The extra field: "FB", its length, then 'Z's up to the next aligned offset.
        let unpadded = offset + 30 + name.len() + 4;
        let pad = (ALIGN - unpadded % ALIGN) % ALIGN;
        let crc = crc32(data);
        let (name_len, extra_len) = (u16_of(name.len(), "name length")?, u16_of(4 + pad, "pad")?);
        let (size, offset32) = (
            u32_of(data.len(), "record size")?,
            u32_of(offset, "offset")?,
        );
        let o = &mut self.out;
        o.extend_from_slice(&LOCAL.to_le_bytes());
        for v in [20u16, 0, 0, 0, DOS_DATE] {
            // version needed, flags, method (stored), time, date
            o.extend_from_slice(&v.to_le_bytes());
        }
        for v in [crc, size, size] {
            o.extend_from_slice(&v.to_le_bytes());
        }
        o.extend_from_slice(&name_len.to_le_bytes());
        o.extend_from_slice(&extra_len.to_le_bytes());
        o.extend_from_slice(name.as_bytes());
        o.extend_from_slice(b"FB");
        o.extend_from_slice(&(pad as u16).to_le_bytes());
        o.resize(o.len() + pad, b'Z');
        debug_assert_eq!(o.len() % ALIGN, 0);
        o.extend_from_slice(data);

        let c = &mut self.central;
        c.extend_from_slice(&CENTRAL.to_le_bytes());
        for v in [20u16, 20, 0, 0, 0, DOS_DATE] {
            // made by, needed, flags, method, time, date
            c.extend_from_slice(&v.to_le_bytes());
        }
        for v in [crc, size, size] {
            c.extend_from_slice(&v.to_le_bytes());
        }
        for v in [name_len, 0, 0, 0, 0] {
            // name, extra, comment lengths, disk, internal attributes
            c.extend_from_slice(&v.to_le_bytes());
        }
        c.extend_from_slice(&0u32.to_le_bytes()); // external attributes
        c.extend_from_slice(&offset32.to_le_bytes());
        c.extend_from_slice(name.as_bytes());
        self.count += 1;
        Ok(())
    }

    fn finish(mut self) -> Result<Vec<u8>> {
        let cd_offset = u32_of(self.out.len(), "central directory offset")?;
        let cd_size = u32_of(self.central.len(), "central directory size")?;
        u32_of(self.out.len() + self.central.len() + 22, "file size")?;
        let n = u16_of(self.count, "record count")?;
        self.out.extend_from_slice(&self.central);
        self.out.extend_from_slice(&END.to_le_bytes());
        for v in [0u16, 0, n, n] {
            self.out.extend_from_slice(&v.to_le_bytes());
        }
        self.out.extend_from_slice(&cd_size.to_le_bytes());
        self.out.extend_from_slice(&cd_offset.to_le_bytes());
        self.out.extend_from_slice(&0u16.to_le_bytes()); // comment length
        Ok(self.out)
    }
}

/// CRC-32 (IEEE, as ZIP uses it).
pub fn crc32(data: &[u8]) -> u32 {
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut t = [0u32; 256];
        for (i, e) in t.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    0xEDB8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
            }
            *e = c;
        }
        t
    });
    !data.iter().fold(!0u32, |c, &b| {
        table[((c ^ b as u32) & 0xff) as usize] ^ (c >> 8)
    })
}

// ---- Reading ----

/// One record of the archive: its full name and where its data lies in the file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub name: String,
    pub offset: usize,
    pub len: usize,
}

fn le16(b: &[u8], at: usize) -> Result<usize> {
    b.get(at..at + 2)
        .map(|s| u16::from_le_bytes([s[0], s[1]]) as usize)
        .context("truncated ZIP structure")
}

fn le32(b: &[u8], at: usize) -> Result<usize> {
    b.get(at..at + 4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]) as usize)
        .context("truncated ZIP structure")
}

/// The records of a stored ZIP archive, in central-directory order, every CRC-32 checked.
pub fn records(bytes: &[u8]) -> Result<Vec<Record>> {
    let lo = bytes.len().saturating_sub(22 + 0xffff);
    let end = (lo..=bytes.len().saturating_sub(22))
        .rev()
        .find(|&i| le32(bytes, i).ok() == Some(END as usize))
        .context("not a ZIP archive (no end of central directory)")?;
    let n = le16(bytes, end + 10)?;
    let mut at = le32(bytes, end + 16)?;
    if n == 0xffff || at == 0xffff_ffff {
        bail!("zip64 archives are not supported");
    }
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        ensure!(
            le32(bytes, at)? == CENTRAL as usize,
            "bad central directory entry at {at}"
        );
        let method = le16(bytes, at + 10)?;
        let crc = le32(bytes, at + 16)? as u32;
        let (csize, size) = (le32(bytes, at + 20)?, le32(bytes, at + 24)?);
        let (name_len, extra_len, comment_len) = (
            le16(bytes, at + 28)?,
            le16(bytes, at + 30)?,
            le16(bytes, at + 32)?,
        );
        let local = le32(bytes, at + 42)?;
        let name = bytes
            .get(at + 46..at + 46 + name_len)
            .context("truncated ZIP structure")?;
        let name = String::from_utf8_lossy(name).to_string();
        ensure!(
            method == 0 && csize == size,
            "{name}: compressed (method {method}); PyTorch archives are stored"
        );
        ensure!(
            le32(bytes, local)? == LOCAL as usize,
            "{name}: bad local header at {local}"
        );
        let offset = local + 30 + le16(bytes, local + 26)? + le16(bytes, local + 28)?;
        let data = bytes
            .get(offset..offset + size)
            .with_context(|| format!("{name}: data past the end of the file"))?;
        ensure!(
            crc32(data) == crc,
            "{name}: CRC-32 {:08x} does not match the archive's {crc:08x}",
            crc32(data)
        );
        out.push(Record {
            name,
            offset,
            len: size,
        });
        at += 46 + name_len + extra_len + comment_len;
    }
    Ok(out)
}

/// A state dict read back: the archive's directory, its records, and the tensors in order.
#[derive(Debug)]
pub struct StateDict<'a> {
    pub archive: String,
    pub records: Vec<Record>,
    pub tensors: Vec<Tensor<'a>>,
}

/// Parses a `pytorch_model.bin` of contiguous float tensors (what [`write`] writes) back.
pub fn read(bytes: &[u8]) -> Result<StateDict<'_>> {
    let records = records(bytes)?;
    let first = records.first().context("empty archive")?;
    let archive = first
        .name
        .split_once('/')
        .map(|(a, _)| a.to_string())
        .with_context(|| format!("record {:?} is not in a directory", first.name))?;
    let by_name: HashMap<&str, &Record> = records.iter().map(|r| (r.name.as_str(), r)).collect();
    let data = |name: &str| -> Result<&[u8]> {
        let r = by_name
            .get(format!("{archive}/{name}").as_str())
            .with_context(|| format!("no record {archive}/{name}"))?;
        Ok(&bytes[r.offset..r.offset + r.len])
    };
    let version = data("version")?;
    ensure!(
        version.trim_ascii() == b"3",
        "version {:?}, expected 3",
        String::from_utf8_lossy(version)
    );
    if let Ok(order) = data("byteorder") {
        ensure!(
            order == b"little",
            "byteorder {:?}",
            String::from_utf8_lossy(order)
        );
    }
    let mut tensors = Vec::new();
    for (name, t) in unpickle(data("data.pkl")?).context("data.pkl")? {
        let storage = data(&format!("data/{}", t.key))?;
        let size = t.storage.elem_size();
        ensure!(
            storage.len() == t.numel * size,
            "{name}: storage {} has {} bytes for {} elements",
            t.key,
            storage.len(),
            t.numel
        );
        let n = numel(&t.shape);
        ensure!(
            t.stride == row_major_strides(&t.shape) && t.offset + n <= t.numel,
            "{name}: not contiguous row-major within its storage (size {:?}, stride {:?}, \
             offset {})",
            t.shape,
            t.stride,
            t.offset
        );
        tensors.push(Tensor {
            name,
            storage: t.storage,
            shape: t.shape,
            data: &storage[t.offset * size..(t.offset + n) * size],
        });
    }
    Ok(StateDict {
        archive,
        records,
        tensors,
    })
}

/// What `data.pkl` says about one tensor.
#[derive(Clone, Debug)]
struct Rebuilt {
    storage: Storage,
    key: String,
    numel: usize,
    offset: usize,
    shape: Vec<usize>,
    stride: Vec<usize>,
}

#[derive(Clone, Debug)]
enum Val {
    Mark,
    None,
    /// `requires_grad` and other flags: read, never needed.
    Bool,
    Int(i64),
    Str(String),
    Tuple(Vec<Val>),
    Global(String),
    Dict(Vec<(Val, Val)>),
    Storage(Storage, String, usize),
    Tensor(Box<Rebuilt>),
}

fn as_usize(v: &Val) -> Result<usize> {
    match v {
        Val::Int(i) if *i >= 0 => Ok(*i as usize),
        _ => bail!("expected a non-negative integer, got {v:?}"),
    }
}

fn usizes(v: &Val) -> Result<Vec<usize>> {
    match v {
        Val::Tuple(items) => items.iter().map(as_usize).collect(),
        _ => bail!("expected a tuple of integers, got {v:?}"),
    }
}

/// A pickle of an `OrderedDict` of `_rebuild_tensor_v2` tensors (with or without memo, as
/// `torch.save` and [`write`] write it); other objects are refused.
fn unpickle(p: &[u8]) -> Result<Vec<(String, Rebuilt)>> {
    let mut stack: Vec<Val> = Vec::new();
    let mut memo: HashMap<usize, Val> = HashMap::new();
    let mut i = 0;
    let take = |i: &mut usize, n: usize| -> Result<&[u8]> {
        let s = p.get(*i..*i + n).context("truncated pickle")?;
        *i += n;
        Ok(s)
    };
    let pop = |stack: &mut Vec<Val>| stack.pop().context("pickle stack underflow");
    let pop_mark = |stack: &mut Vec<Val>| -> Result<Vec<Val>> {
        let m = stack
            .iter()
            .rposition(|v| matches!(v, Val::Mark))
            .context("no MARK")?;
        let items = stack.split_off(m + 1);
        stack.pop();
        Ok(items)
    };
    loop {
        let op = take(&mut i, 1)?[0];
        match op {
            0x80 => {
                take(&mut i, 1)?;
            }
            b'c' => {
                let mut lines = p[i..].splitn(3, |&b| b == b'\n');
                let (Some(m), Some(n), Some(_)) = (lines.next(), lines.next(), lines.next())
                else {
                    bail!("truncated GLOBAL")
                };
                i += m.len() + n.len() + 2;
                stack.push(Val::Global(format!(
                    "{}.{}",
                    String::from_utf8_lossy(m),
                    String::from_utf8_lossy(n)
                )));
            }
            b'q' | b'r' => {
                let idx = if op == b'q' {
                    take(&mut i, 1)?[0] as usize
                } else {
                    le32(take(&mut i, 4)?, 0)?
                };
                memo.insert(idx, stack.last().context("BINPUT on empty stack")?.clone());
            }
            b'h' | b'j' => {
                let idx = if op == b'h' {
                    take(&mut i, 1)?[0] as usize
                } else {
                    le32(take(&mut i, 4)?, 0)?
                };
                stack.push(memo.get(&idx).context("BINGET of unknown memo")?.clone());
            }
            b'(' => stack.push(Val::Mark),
            b')' => stack.push(Val::Tuple(vec![])),
            b't' => {
                let items = pop_mark(&mut stack)?;
                stack.push(Val::Tuple(items));
            }
            0x85..=0x87 => {
                let n = (op - 0x84) as usize;
                ensure!(stack.len() >= n, "pickle stack underflow");
                let items = stack.split_off(stack.len() - n);
                stack.push(Val::Tuple(items));
            }
            b'N' => stack.push(Val::None),
            0x88 => stack.push(Val::Bool),
            0x89 => stack.push(Val::Bool),
            b'K' => stack.push(Val::Int(take(&mut i, 1)?[0] as i64)),
            b'M' => stack.push(Val::Int(le16(take(&mut i, 2)?, 0)? as i64)),
            b'J' => {
                let b = take(&mut i, 4)?;
                stack.push(Val::Int(i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as i64));
            }
            0x8a => {
                let n = take(&mut i, 1)?[0] as usize;
                let b = take(&mut i, n)?;
                ensure!(n <= 8, "LONG1 of {n} bytes");
                let mut buf = if b.last().is_some_and(|x| x & 0x80 != 0) {
                    [0xff; 8]
                } else {
                    [0; 8]
                };
                buf[..n].copy_from_slice(b);
                stack.push(Val::Int(i64::from_le_bytes(buf)));
            }
            b'X' => {
                let n = le32(take(&mut i, 4)?, 0)?;
                let s = take(&mut i, n)?;
                stack.push(Val::Str(
                    std::str::from_utf8(s)
                        .context("BINUNICODE is not UTF-8")?
                        .to_string(),
                ));
            }
            b'}' => stack.push(Val::Dict(vec![])),
            b'Q' => {
                let pid = pop(&mut stack)?;
                let Val::Tuple(t) = &pid else {
                    bail!("persistent id {pid:?}")
                };
                match t.as_slice() {
                    [Val::Str(s), Val::Global(g), Val::Str(key), Val::Str(_), n]
                        if s == "storage" =>
                    {
                        let class = g.strip_prefix("torch.").unwrap_or(g);
                        let st = Storage::from_class(class)
                            .with_context(|| format!("storage type {g} (f32/f16 only)"))?;
                        stack.push(Val::Storage(st, key.clone(), as_usize(n)?));
                    }
                    _ => bail!("persistent id {pid:?}"),
                }
            }
            b'R' => {
                let args = pop(&mut stack)?;
                let f = pop(&mut stack)?;
                let (Val::Global(f), Val::Tuple(args)) = (&f, &args) else {
                    bail!("REDUCE of {f:?} with {args:?}")
                };
                let v = match (f.as_str(), args.as_slice()) {
                    ("collections.OrderedDict", []) => Val::Dict(vec![]),
                    (
                        "torch._utils._rebuild_tensor_v2",
                        [Val::Storage(st, key, n), off, size, stride, _, _, ..],
                    ) => Val::Tensor(Box::new(Rebuilt {
                        storage: *st,
                        key: key.clone(),
                        numel: *n,
                        offset: as_usize(off)?,
                        shape: usizes(size)?,
                        stride: usizes(stride)?,
                    })),
                    _ => bail!("REDUCE of {f} with {args:?} is not a state dict's"),
                };
                stack.push(v);
            }
            b's' | b'u' => {
                let items = if op == b's' {
                    ensure!(stack.len() >= 2, "pickle stack underflow");
                    stack.split_off(stack.len() - 2)
                } else {
                    pop_mark(&mut stack)?
                };
                ensure!(items.len() % 2 == 0, "SETITEMS with an odd number of items");
                let Some(Val::Dict(d)) = stack.last_mut() else {
                    bail!("SETITEMS without a dict")
                };
                let mut it = items.into_iter();
                while let (Some(k), Some(v)) = (it.next(), it.next()) {
                    d.push((k, v));
                }
            }
            b'.' => break,
            _ => bail!("pickle opcode 0x{op:02x} at {} is not supported", i - 1),
        }
    }
    let Some(Val::Dict(d)) = stack.pop() else {
        bail!("the pickle is not a dict")
    };
    d.into_iter()
        .map(|(k, v)| match (k, v) {
            (Val::Str(k), Val::Tensor(t)) => Ok((k, *t)),
            (k, v) => bail!("entry {k:?}: {v:?} is not a tensor"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_check_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32(b""), 0);
    }

    #[test]
    fn round_trip_with_every_shape_kind() {
        let a: Vec<u8> = (0..2 * 3 * 4 * 5 * 4).map(|i| i as u8).collect();
        let b: Vec<u8> = vec![1, 2, 3, 4];
        let c: Vec<u8> = (0..6).collect();
        let tensors = vec![
            Tensor {
                name: "four.dims".into(),
                storage: Storage::Float,
                shape: vec![2, 3, 4, 5],
                data: &a,
            },
            Tensor {
                name: "scalar".into(),
                storage: Storage::Float,
                shape: vec![],
                data: &b,
            },
            Tensor {
                name: "half".into(),
                storage: Storage::Half,
                shape: vec![3],
                data: &c,
            },
        ];
        let bytes = write(&tensors).unwrap();
        let sd = read(&bytes).unwrap();
        assert_eq!(sd.archive, ARCHIVE);
        assert_eq!(sd.tensors, tensors);
        for r in &sd.records {
            assert_eq!(r.offset % ALIGN, 0, "{r:?}");
        }
        // Deterministic: the same tensors, the same bytes.
        assert_eq!(write(&tensors).unwrap(), bytes);
        // A flipped data byte fails its CRC.
        let mut bad = bytes.clone();
        bad[sd.records[2].offset] ^= 1;
        assert!(format!("{:#}", read(&bad).unwrap_err()).contains("CRC"));
        // Wrong sizes are refused on write.
        let short = [Tensor {
            data: &b[..2],
            ..tensors[1].clone()
        }];
        assert!(write(&short).is_err());
    }

    #[test]
    fn integers_as_pythons_pickler_writes_them() {
        let enc = |v: u64| {
            let mut p = Pickle::default();
            p.int(v);
            p.0
        };
        assert_eq!(enc(7), [b'K', 7]);
        assert_eq!(enc(30522), [b'M', 0x3a, 0x77]);
        assert_eq!(enc(23_440_896), [b'J', 0x00, 0xae, 0x65, 0x01]);
        assert_eq!(enc(1 << 31), [0x8a, 5, 0, 0, 0, 0x80, 0]);
        assert_eq!(enc(1 << 32), [0x8a, 5, 0, 0, 0, 0, 1]);
    }
}
