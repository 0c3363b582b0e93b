//! JSON read with named fields only. serde lets a struct be written as an array of its fields
//! in declaration order (`["Bus", "bus", null, []]` for a broker), which no user means and which
//! slips past `deny_unknown_fields`; [`Strict`] refuses an array wherever an object is expected,
//! at any depth, so the error names the field.

use serde::de::{
    self, DeserializeOwned, DeserializeSeed, IntoDeserializer, MapAccess, SeqAccess, Unexpected, Visitor,
};
use serde::forward_to_deserialize_any;
use serde_json::Value;

/// What an array in place of an object is told it should have been.
const EXPECTED: &str = "an object with named fields (not an array of values by position)";

/// Deserializes `T` from `value`, refusing arrays where an object is expected.
pub fn from_value<T: DeserializeOwned>(value: Value) -> Result<T, serde_json::Error> {
    T::deserialize(Strict(value))
}

/// A [`serde_json::Value`] as a deserializer that refuses arrays in place of structs.
pub struct Strict(pub Value);

impl<'de> de::Deserializer<'de> for Strict {
    type Error = serde_json::Error;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        match self.0 {
            Value::Array(items) => visitor.visit_seq(Items(items.into_iter())),
            Value::Object(map) => visitor.visit_map(Fields { iter: map.into_iter(), value: None }),
            other => de::Deserializer::deserialize_any(other, visitor),
        }
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        match self.0 {
            Value::Array(_) => Err(de::Error::invalid_type(Unexpected::Seq, &EXPECTED)),
            Value::Object(map) => visitor.visit_map(Fields { iter: map.into_iter(), value: None }),
            other => de::Deserializer::deserialize_struct(other, name, fields, visitor),
        }
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        match self.0 {
            Value::Null => visitor.visit_none(),
            other => visitor.visit_some(Strict(other)),
        }
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        name: &'static str,
        variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        de::Deserializer::deserialize_enum(self.0, name, variants, visitor)
    }

    forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf unit
        unit_struct seq tuple tuple_struct map identifier ignored_any
    }
}

struct Items(std::vec::IntoIter<Value>);

impl<'de> SeqAccess<'de> for Items {
    type Error = serde_json::Error;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, Self::Error> {
        self.0.next().map(|v| seed.deserialize(Strict(v))).transpose()
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.0.len())
    }
}

struct Fields {
    iter: serde_json::map::IntoIter,
    value: Option<Value>,
}

impl<'de> MapAccess<'de> for Fields {
    type Error = serde_json::Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(&mut self, seed: K) -> Result<Option<K::Value>, Self::Error> {
        let Some((key, value)) = self.iter.next() else { return Ok(None) };
        self.value = Some(value);
        seed.deserialize(key.into_deserializer()).map(Some)
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, Self::Error> {
        let value = self.value.take().ok_or_else(|| de::Error::custom("a value without its key"))?;
        seed.deserialize(Strict(value))
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.iter.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;
    use serde_json::json;
    use std::collections::BTreeMap;

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Inner {
        a: u32,
    }

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Outer {
        name: String,
        inner: Option<Inner>,
        list: Vec<Inner>,
        map: BTreeMap<String, String>,
        any: Option<Value>,
    }

    #[test]
    fn objects_lists_maps_and_raw_values_still_read() {
        let outer: Outer = from_value(json!({"name": "n", "inner": {"a": 1}, "list": [{"a": 2}],
            "map": {"k": "v"}, "any": [1, {"x": [2]}]}))
        .unwrap();
        assert_eq!(outer.inner, Some(Inner { a: 1 }));
        assert_eq!(outer.list, vec![Inner { a: 2 }]);
        assert_eq!(outer.any, Some(json!([1, {"x": [2]}])));
    }

    #[test]
    fn arrays_in_place_of_objects_are_refused_at_any_depth() {
        assert!(
            serde_json::from_value::<Outer>(json!(["n", null, [], {}, null])).is_ok(),
            "serde alone takes it"
        );
        for doc in [
            json!(["n", null, [], {}, null]),
            json!({"name": "n", "inner": [1], "list": [], "map": {}}),
            json!({"name": "n", "list": [[2]], "map": {}}),
        ] {
            let err = serde_path_to_error::deserialize::<_, Outer>(Strict(doc.clone())).unwrap_err();
            assert!(err.inner().to_string().contains("named fields"), "{doc}: {err}");
        }
        let err = serde_path_to_error::deserialize::<_, Outer>(Strict(
            json!({"name": "n", "list": [[2]], "map": {}}),
        ))
        .unwrap_err();
        assert_eq!(err.path().to_string(), "list[0]");
    }
}
