//! Datum-to-JSON encoding: one NDJSON line per row, byte for byte what
//! `row_to_json(r)::text` returns.
//!
//! A [`RowEncoder`] is planned once per result shape: each column gets a
//! [`ValueEncoder`] chosen the way PostgreSQL's `json_categorize_type`
//! does (domains look through to their base type). Common types are
//! rendered directly from the datum by the pure-Rust formatters in the
//! submodules; every other type goes through PostgreSQL's own output or
//! cast-to-json function, exactly as `datum_to_json` does.
//!
//! This is one of the few modules that touch `pg_sys`: datums are raw
//! pointers or values whose layout is known from the type.

mod array;
pub mod datetime;
pub mod escape;
pub mod jsonb;
pub mod number;

use std::ffi::CStr;

use pgrx::{pg_sys, PgSqlErrorCode};

use crate::error::raise;
use crate::options::JsonStyle;
use escape::escape_json_into;

/// Settings of the session and options of the export that change how
/// values render.
#[derive(Clone, Copy)]
struct Settings {
    extra_float_digits: i32,
    /// The session time zone's offset east of UTC when it never changes
    /// (UTC, fixed offsets); `None` means ask PostgreSQL per value.
    fixed_gmtoff: Option<i32>,
    style: JsonStyle,
}

impl Settings {
    fn current(style: JsonStyle) -> Settings {
        // SAFETY: reading two GUC-backed globals of the backend; the time
        // zone pointer is always valid once the session has started.
        unsafe {
            let mut gmtoff: std::ffi::c_long = 0;
            let fixed = pg_sys::pg_get_timezone_offset(pg_sys::session_timezone, &mut gmtoff);
            Settings {
                extra_float_digits: pg_sys::extra_float_digits,
                fixed_gmtoff: fixed.then_some(gmtoff as i32),
                style,
            }
        }
    }
}

/// How one value of a given type is rendered.
enum ValueEncoder {
    Bool,
    Int2,
    Int4,
    Int8,
    /// int8 as a JSON string (`bigint_as_string`).
    Int8String,
    /// `oid` is not a JSON number for `row_to_json`: it renders quoted.
    Oid,
    Float4,
    Float8,
    Numeric,
    /// numeric as a JSON string of its text form (`numeric_as_string`).
    NumericString,
    /// text, varchar, bpchar: the stored bytes, escaped.
    Text,
    /// name: the bytes up to the first NUL, escaped.
    Name,
    /// json: the stored text, verbatim.
    Json,
    Jsonb,
    Uuid,
    Date,
    Timestamp,
    Timestamptz,
    /// timestamptz in UTC with `Z` (`timestamptz_utc`).
    TimestamptzUtc,
    /// bytea as base64 (`bytea_base64`).
    ByteaBase64,
    Array(Box<ArrayEncoder>),
    Composite(Box<CompositeEncoder>),
    /// PostgreSQL's output function, then escaped as a JSON string.
    Output(Box<pg_sys::FmgrInfo>),
    /// A user-defined cast to json: its result is JSON text, copied as is.
    Cast(Box<pg_sys::FmgrInfo>),
}

struct ArrayEncoder {
    element_type: pg_sys::Oid,
    element: ValueEncoder,
    typlen: i16,
    byval: bool,
    align: u8,
}

struct CompositeEncoder {
    /// Plans by (type oid, typmod); named types have one, anonymous
    /// records one per distinct shape seen.
    plans: Vec<(pg_sys::Oid, i32, RowEncoder)>,
}

/// The encoding plan for rows of one tuple descriptor.
pub struct RowEncoder {
    columns: Vec<Column>,
    values: Vec<pg_sys::Datum>,
    nulls: Vec<bool>,
    settings: Settings,
    /// Memory context holding function-call info that lives with the plan.
    cxt: pg_sys::MemoryContext,
}

struct Column {
    /// Zero-based attribute number.
    index: usize,
    /// `{"name":` for the first column, `,"name":` for the others.
    key: Vec<u8>,
    encoder: ValueEncoder,
}

impl RowEncoder {
    /// Plan the encoding of rows described by `tupdesc`, in `style`.
    /// Function-call info is allocated in `cxt`, which must outlive the
    /// encoder.
    ///
    /// # Safety
    /// `tupdesc` must be a valid tuple descriptor.
    pub unsafe fn new(
        tupdesc: pg_sys::TupleDesc,
        cxt: pg_sys::MemoryContext,
        style: JsonStyle,
    ) -> RowEncoder {
        let settings = Settings::current(style);
        // SAFETY: the caller guarantees `tupdesc` is valid.
        unsafe { Self::with_settings(tupdesc, cxt, settings) }
    }

    /// # Safety
    ///
    /// `tupdesc` must be a valid tuple descriptor and `cxt` a memory context
    /// that outlives the encoder.
    unsafe fn with_settings(
        tupdesc: pg_sys::TupleDesc,
        cxt: pg_sys::MemoryContext,
        settings: Settings,
    ) -> RowEncoder {
        // SAFETY: `tupdesc` is valid (caller); attributes are read within
        // natts.
        unsafe {
            let natts = (*tupdesc).natts as usize;
            let attrs = crate::compat::attributes(tupdesc);
            let mut columns = Vec::with_capacity(natts);
            for (index, attr) in attrs.iter().enumerate() {
                if attr.attisdropped {
                    continue;
                }
                let name = CStr::from_ptr(attr.attname.data.as_ptr()).to_bytes();
                let mut key = Vec::with_capacity(name.len() + 4);
                key.push(if columns.is_empty() { b'{' } else { b',' });
                escape_json_into(&mut key, name);
                key.push(b':');
                columns.push(Column {
                    index,
                    key,
                    encoder: ValueEncoder::plan(attr.atttypid, cxt, settings.style),
                });
            }
            RowEncoder {
                columns,
                values: vec![pg_sys::Datum::from(0usize); natts],
                nulls: vec![true; natts],
                settings,
                cxt,
            }
        }
    }

    /// Append the JSON object for a row given as parallel `values` / `nulls`
    /// arrays (at least `natts` long).
    ///
    /// # Safety
    /// The datums must be valid values of the descriptor's column types.
    pub unsafe fn encode_values(
        &mut self,
        out: &mut Vec<u8>,
        values: *const pg_sys::Datum,
        nulls: *const bool,
    ) {
        if self.columns.is_empty() {
            out.extend_from_slice(b"{}");
            return;
        }
        let settings = self.settings;
        let cxt = self.cxt;
        if settings.style.omit_nulls {
            // SAFETY: as below.
            unsafe { self.encode_values_omitting_nulls(out, values, nulls) };
            return;
        }
        for column in &mut self.columns {
            out.extend_from_slice(&column.key);
            // SAFETY: index < natts by construction; the caller vouches for
            // the datums.
            unsafe {
                if *nulls.add(column.index) {
                    out.extend_from_slice(b"null");
                } else {
                    column
                        .encoder
                        .encode(out, *values.add(column.index), &settings, cxt);
                }
            }
        }
        out.push(b'}');
    }

    /// As [`RowEncoder::encode_values`], leaving out the keys whose value
    /// is NULL (`omit_nulls`; the row's own keys only).
    ///
    /// # Safety
    /// As for [`RowEncoder::encode_values`].
    unsafe fn encode_values_omitting_nulls(
        &mut self,
        out: &mut Vec<u8>,
        values: *const pg_sys::Datum,
        nulls: *const bool,
    ) {
        let settings = self.settings;
        let cxt = self.cxt;
        let mut first = true;
        for column in &mut self.columns {
            // SAFETY: index < natts by construction; the caller vouches for
            // the datums.
            unsafe {
                if *nulls.add(column.index) {
                    continue;
                }
                out.push(if first { b'{' } else { b',' });
                first = false;
                out.extend_from_slice(&column.key[1..]);
                column
                    .encoder
                    .encode(out, *values.add(column.index), &settings, cxt);
            }
        }
        if first {
            out.push(b'{');
        }
        out.push(b'}');
    }

    /// Append the JSON object for a composite datum (a HeapTupleHeader).
    ///
    /// # Safety
    /// `header` must be a detoasted tuple of this encoder's descriptor.
    unsafe fn encode_tuple(
        &mut self,
        out: &mut Vec<u8>,
        header: pg_sys::HeapTupleHeader,
        tupdesc: pg_sys::TupleDesc,
    ) {
        // SAFETY: a temporary HeapTupleData over the datum, as PostgreSQL's
        // composite_to_json builds; deformed into our own arrays.
        unsafe {
            let mut tuple = pg_sys::HeapTupleData {
                t_len: varsize_4b(header.cast()) as u32,
                t_data: header,
                ..Default::default()
            };
            pg_sys::heap_deform_tuple(
                &mut tuple,
                tupdesc,
                self.values.as_mut_ptr(),
                self.nulls.as_mut_ptr(),
            );
            let values = self.values.as_ptr();
            let nulls = self.nulls.as_ptr();
            self.encode_values(out, values, nulls);
        }
    }
}

/// Built-in type OIDs used to pick fast paths.
mod oids {
    use pgrx::pg_sys::{BuiltinOid, Oid};
    pub const fn of(b: BuiltinOid) -> Oid {
        b.value()
    }
}

impl ValueEncoder {
    /// Choose the encoder for values of type `typid` (json_categorize_type),
    /// with the type options of `style`.
    ///
    /// # Safety
    /// Catalog lookups; must run in a transaction.
    unsafe fn plan(
        typid: pg_sys::Oid,
        cxt: pg_sys::MemoryContext,
        style: JsonStyle,
    ) -> ValueEncoder {
        use pg_sys::BuiltinOid as B;
        // SAFETY: plain catalog lookups in a live transaction.
        unsafe {
            let base = pg_sys::getBaseType(typid);
            let builtin = B::from_u32(base.to_u32()).ok();
            match builtin {
                Some(B::INT8OID) if style.bigint_as_string => return ValueEncoder::Int8String,
                Some(B::NUMERICOID) if style.numeric_as_string => {
                    return ValueEncoder::NumericString
                }
                Some(B::TIMESTAMPTZOID) if style.timestamptz_utc => {
                    return ValueEncoder::TimestamptzUtc
                }
                Some(B::BYTEAOID) if style.bytea_base64 => return ValueEncoder::ByteaBase64,
                Some(B::BOOLOID) => return ValueEncoder::Bool,
                Some(B::INT2OID) => return ValueEncoder::Int2,
                Some(B::INT4OID) => return ValueEncoder::Int4,
                Some(B::INT8OID) => return ValueEncoder::Int8,
                Some(B::OIDOID) => return ValueEncoder::Oid,
                Some(B::FLOAT4OID) => return ValueEncoder::Float4,
                Some(B::FLOAT8OID) => return ValueEncoder::Float8,
                Some(B::NUMERICOID) => return ValueEncoder::Numeric,
                Some(B::TEXTOID) | Some(B::VARCHAROID) | Some(B::BPCHAROID) => {
                    return ValueEncoder::Text
                }
                Some(B::NAMEOID) => return ValueEncoder::Name,
                Some(B::JSONOID) => return ValueEncoder::Json,
                Some(B::JSONBOID) => return ValueEncoder::Jsonb,
                Some(B::UUIDOID) => return ValueEncoder::Uuid,
                Some(B::DATEOID) => return ValueEncoder::Date,
                Some(B::TIMESTAMPOID) => return ValueEncoder::Timestamp,
                Some(B::TIMESTAMPTZOID) => return ValueEncoder::Timestamptz,
                _ => {}
            }
            let element_type = pg_sys::get_element_type(base);
            if element_type != pg_sys::InvalidOid {
                return ValueEncoder::Array(Box::new(ArrayEncoder::plan(element_type, cxt, style)));
            }
            if base == oids::of(B::ANYARRAYOID) {
                // The element type is only known per value.
                return ValueEncoder::Array(Box::new(ArrayEncoder::plan(
                    pg_sys::InvalidOid,
                    cxt,
                    style,
                )));
            }
            if pg_sys::type_is_rowtype(base) {
                return ValueEncoder::Composite(Box::new(CompositeEncoder { plans: Vec::new() }));
            }
            if base.to_u32() >= pg_sys::FirstNormalObjectId {
                let mut cast_func = pg_sys::InvalidOid;
                let path = pg_sys::find_coercion_pathway(
                    oids::of(B::JSONOID),
                    base,
                    pg_sys::CoercionContext::COERCION_EXPLICIT,
                    &mut cast_func,
                );
                if path == pg_sys::CoercionPathType::COERCION_PATH_FUNC
                    && cast_func != pg_sys::InvalidOid
                {
                    return ValueEncoder::Cast(fmgr_info(cast_func, cxt));
                }
            }
            let mut output_func = pg_sys::InvalidOid;
            let mut is_varlena = false;
            pg_sys::getTypeOutputInfo(base, &mut output_func, &mut is_varlena);
            ValueEncoder::Output(fmgr_info(output_func, cxt))
        }
    }

    /// Append the JSON for one non-NULL datum.
    ///
    /// # Safety
    /// `datum` must be a valid value of the type this encoder was planned for.
    unsafe fn encode(
        &mut self,
        out: &mut Vec<u8>,
        datum: pg_sys::Datum,
        settings: &Settings,
        cxt: pg_sys::MemoryContext,
    ) {
        // SAFETY: each arm reads the datum according to its type's layout.
        unsafe {
            match self {
                ValueEncoder::Bool => out.extend_from_slice(if datum.value() & 0xff != 0 {
                    b"true" as &[u8]
                } else {
                    b"false"
                }),
                ValueEncoder::Int2 => number::push_int(out, datum.value() as i16 as i64),
                ValueEncoder::Int4 => number::push_int(out, datum.value() as i32 as i64),
                ValueEncoder::Int8 => number::push_int(out, datum.value() as i64),
                ValueEncoder::Int8String => {
                    out.push(b'"');
                    number::push_int(out, datum.value() as i64);
                    out.push(b'"');
                }
                ValueEncoder::Oid => {
                    out.push(b'"');
                    number::push_int(out, datum.value() as u32 as i64);
                    out.push(b'"');
                }
                ValueEncoder::Float4 => {
                    let value = f32::from_bits(datum.value() as u32);
                    quote_if(out, !value.is_finite(), |out| {
                        number::push_float4(out, value, settings.extra_float_digits)
                    });
                }
                ValueEncoder::Float8 => {
                    let value = f64::from_bits(datum.value() as u64);
                    quote_if(out, !value.is_finite(), |out| {
                        number::push_float8(out, value, settings.extra_float_digits)
                    });
                }
                ValueEncoder::Numeric => {
                    let payload = varlena_payload(datum);
                    let start = out.len();
                    if number::push_numeric(out, payload) == number::NumericKind::Special {
                        out.insert(start, b'"');
                        out.push(b'"');
                    }
                }
                ValueEncoder::NumericString => {
                    out.push(b'"');
                    number::push_numeric(out, varlena_payload(datum));
                    out.push(b'"');
                }
                ValueEncoder::Text => escape_json_into(out, varlena_payload(datum)),
                ValueEncoder::Name => {
                    let name = CStr::from_ptr(datum.cast_mut_ptr::<std::ffi::c_char>());
                    escape_json_into(out, name.to_bytes());
                }
                ValueEncoder::Json => out.extend_from_slice(varlena_payload(datum)),
                ValueEncoder::Jsonb => {
                    if jsonb::push_jsonb(out, varlena_payload(datum)).is_err() {
                        raise(
                            PgSqlErrorCode::ERRCODE_DATA_CORRUPTED,
                            "malformed jsonb value",
                            None,
                        );
                    }
                }
                ValueEncoder::Uuid => {
                    let bytes = std::slice::from_raw_parts(datum.cast_mut_ptr::<u8>(), 16);
                    push_uuid(out, bytes);
                }
                ValueEncoder::Date => {
                    out.push(b'"');
                    datetime::push_date(out, datum.value() as i32);
                    out.push(b'"');
                }
                ValueEncoder::Timestamp => {
                    out.push(b'"');
                    if !datetime::push_timestamp(out, datum.value() as i64) {
                        timestamp_out_of_range();
                    }
                    out.push(b'"');
                }
                ValueEncoder::Timestamptz => {
                    out.push(b'"');
                    push_timestamptz(out, datum.value() as i64, settings);
                    out.push(b'"');
                }
                ValueEncoder::TimestamptzUtc => {
                    out.push(b'"');
                    push_timestamptz_utc(out, datum.value() as i64);
                    out.push(b'"');
                }
                ValueEncoder::ByteaBase64 => {
                    out.push(b'"');
                    escape::push_base64(out, varlena_payload(datum));
                    out.push(b'"');
                }
                ValueEncoder::Array(array) => array.encode(out, datum, settings, cxt),
                ValueEncoder::Composite(composite) => composite.encode(out, datum, settings, cxt),
                ValueEncoder::Output(flinfo) => {
                    let text = pg_sys::OutputFunctionCall(flinfo.as_mut(), datum);
                    escape_json_into(out, CStr::from_ptr(text).to_bytes());
                }
                ValueEncoder::Cast(flinfo) => {
                    let json =
                        pg_sys::FunctionCall1Coll(flinfo.as_mut(), pg_sys::InvalidOid, datum);
                    out.extend_from_slice(varlena_payload(json));
                }
            }
        }
    }
}

fn quote_if(out: &mut Vec<u8>, quote: bool, body: impl FnOnce(&mut Vec<u8>)) {
    if quote {
        out.push(b'"');
    }
    body(out);
    if quote {
        out.push(b'"');
    }
}

fn timestamp_out_of_range() -> ! {
    raise(
        PgSqlErrorCode::ERRCODE_DATETIME_FIELD_OVERFLOW,
        "timestamp out of range",
        None,
    )
}

fn push_timestamptz(out: &mut Vec<u8>, timestamp: i64, settings: &Settings) {
    if let Some(gmtoff) = settings.fixed_gmtoff {
        if !datetime::push_timestamptz_fixed(out, timestamp, gmtoff) {
            timestamp_out_of_range();
        }
        return;
    }
    if datetime::push_special_timestamp(out, timestamp) {
        return;
    }
    let mut tm = pg_sys::pg_tm::default();
    let mut fsec: pg_sys::fsec_t = 0;
    let mut tz: i32 = 0;
    // SAFETY: timestamp2tm only writes the out-parameters; NULL time zone
    // means the session's, as timestamptz_out uses.
    let rc = unsafe {
        pg_sys::timestamp2tm(
            timestamp,
            &mut tz,
            &mut tm,
            &mut fsec,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
        )
    };
    if rc != 0 {
        timestamp_out_of_range();
    }
    let fields = datetime::Tm {
        year: tm.tm_year,
        month: tm.tm_mon,
        day: tm.tm_mday,
        hour: tm.tm_hour,
        minute: tm.tm_min,
        second: tm.tm_sec,
        fsec,
    };
    datetime::push_timestamp_tm(out, &fields, Some(tz));
}

fn push_timestamptz_utc(out: &mut Vec<u8>, timestamp: i64) {
    if !datetime::push_timestamptz_utc(out, timestamp) {
        timestamp_out_of_range();
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

fn push_uuid(out: &mut Vec<u8>, bytes: &[u8]) {
    out.push(b'"');
    for (i, b) in bytes.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            out.push(b'-');
        }
        out.push(HEX[(b >> 4) as usize]);
        out.push(HEX[(b & 0xf) as usize]);
    }
    out.push(b'"');
}

/// The payload bytes of a varlena datum, detoasted (decompressed or fetched
/// from TOAST) when needed; short headers are read in place.
///
/// # Safety
/// `datum` must point to a varlena; the result lives in the current memory
/// context (or the tuple) and must not outlive it.
unsafe fn varlena_payload<'a>(datum: pg_sys::Datum) -> &'a [u8] {
    // SAFETY: the caller guarantees a varlena; pg_detoast_datum_packed
    // returns either the input (already plain) or a palloc'd plain copy.
    unsafe {
        let mut ptr = datum.cast_mut_ptr::<pg_sys::varlena>();
        let first = *ptr.cast::<u8>();
        let is_external = first == 0x01;
        let is_compressed = first & 0x03 == 0x02;
        if is_external || is_compressed {
            ptr = pg_sys::pg_detoast_datum_packed(ptr);
        }
        pgrx::varlena::varlena_to_byte_slice(ptr)
    }
}

/// VARSIZE of a varlena known to have a 4-byte header.
///
/// # Safety
///
/// `ptr` must point to a varlena with a 4-byte header.
unsafe fn varsize_4b(ptr: *const pg_sys::varlena) -> usize {
    // SAFETY: the caller guarantees a 4-byte header.
    unsafe { pgrx::varlena::varsize_4b(ptr) }
}

/// `fmgr_info_cxt` into a boxed FmgrInfo whose cache lives in `cxt`.
///
/// # Safety
///
/// `func` must be the OID of a function and `cxt` a memory context that
/// outlives every call through the result.
unsafe fn fmgr_info(func: pg_sys::Oid, cxt: pg_sys::MemoryContext) -> Box<pg_sys::FmgrInfo> {
    let mut info = Box::new(pg_sys::FmgrInfo::default());
    // SAFETY: fills the struct we own; its fn_extra caches go into `cxt`.
    unsafe { pg_sys::fmgr_info_cxt(func, info.as_mut(), cxt) };
    info
}

impl ArrayEncoder {
    /// # Safety
    ///
    /// Catalog lookups, so in a transaction; `cxt` must be a memory context
    /// that outlives the encoder.
    unsafe fn plan(
        element_type: pg_sys::Oid,
        cxt: pg_sys::MemoryContext,
        style: JsonStyle,
    ) -> ArrayEncoder {
        let mut typlen = 0i16;
        let mut byval = false;
        let mut align = 0 as std::ffi::c_char;
        let element = if element_type == pg_sys::InvalidOid {
            ValueEncoder::Json // placeholder, replanned from the first value
        } else {
            // SAFETY: catalog lookups in a live transaction.
            unsafe {
                pg_sys::get_typlenbyvalalign(element_type, &mut typlen, &mut byval, &mut align);
                ValueEncoder::plan(element_type, cxt, style)
            }
        };
        ArrayEncoder {
            element_type,
            element,
            typlen,
            byval,
            align: align as u8,
        }
    }

    /// # Safety
    ///
    /// `datum` must be a (possibly toasted) array of the element type this
    /// encoder was planned for, and `cxt` a live memory context.
    unsafe fn encode(
        &mut self,
        out: &mut Vec<u8>,
        datum: pg_sys::Datum,
        settings: &Settings,
        cxt: pg_sys::MemoryContext,
    ) {
        // SAFETY: an array datum, detoasted to a plain 4-byte-header copy.
        unsafe {
            let array = pg_sys::pg_detoast_datum(datum.cast_mut_ptr()).cast::<pg_sys::ArrayType>();
            let parsed = array::ArrayRef::new(array);
            if parsed.element_type() != self.element_type {
                *self = ArrayEncoder::plan(parsed.element_type(), cxt, settings.style);
            }
            if parsed.item_count() == 0 {
                out.extend_from_slice(b"[]");
                return;
            }
            let mut items = parsed.items(self.typlen, self.byval, self.align);
            let dims = parsed.dims();
            self.encode_dim(out, &dims, 0, &mut items, settings, cxt);
        }
    }

    /// # Safety
    ///
    /// `items` must walk the elements of an array of the planned element type
    /// whose dimensions are `dims`; `cxt` must be a live memory context.
    unsafe fn encode_dim(
        &mut self,
        out: &mut Vec<u8>,
        dims: &[i32],
        dim: usize,
        items: &mut array::Items,
        settings: &Settings,
        cxt: pg_sys::MemoryContext,
    ) {
        out.push(b'[');
        for i in 0..dims[dim] {
            if i > 0 {
                out.push(b',');
            }
            if dim + 1 == dims.len() {
                // SAFETY: items yields exactly the product of dims values of
                // the element type.
                unsafe {
                    match items.next() {
                        Some(Some(value)) => self.element.encode(out, value, settings, cxt),
                        _ => out.extend_from_slice(b"null"),
                    }
                }
            } else {
                // SAFETY: as above, one level down.
                unsafe { self.encode_dim(out, dims, dim + 1, items, settings, cxt) };
            }
        }
        out.push(b']');
    }
}

impl CompositeEncoder {
    /// # Safety
    ///
    /// `datum` must be a (possibly toasted) composite of the type this encoder
    /// was planned for, and `cxt` a live memory context.
    unsafe fn encode(
        &mut self,
        out: &mut Vec<u8>,
        datum: pg_sys::Datum,
        settings: &Settings,
        cxt: pg_sys::MemoryContext,
    ) {
        // SAFETY: a composite datum is a HeapTupleHeader varlena; its type
        // and typmod come from the header, as in composite_to_json.
        unsafe {
            let header = pg_sys::pg_detoast_datum(datum.cast_mut_ptr())
                .cast::<pg_sys::HeapTupleHeaderData>();
            let typid = (*header).t_choice.t_datum.datum_typeid;
            let typmod = (*header).t_choice.t_datum.datum_typmod;
            let tupdesc = pg_sys::lookup_rowtype_tupdesc(typid, typmod);
            let position = self
                .plans
                .iter()
                .position(|(t, m, _)| *t == typid && *m == typmod);
            let index = match position {
                Some(index) => index,
                None => {
                    // Keys are left out of the row itself only.
                    let nested = Settings {
                        style: JsonStyle {
                            omit_nulls: false,
                            ..settings.style
                        },
                        ..*settings
                    };
                    let plan = RowEncoder::with_settings(tupdesc, cxt, nested);
                    self.plans.push((typid, typmod, plan));
                    self.plans.len() - 1
                }
            };
            self.plans[index].2.encode_tuple(out, header, tupdesc);
            pg_sys::DecrTupleDescRefCount(tupdesc);
        }
    }
}
