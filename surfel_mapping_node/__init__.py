"""Dense surfel mapping on the CPU: the ROS-free core, dataset readers and the ROS 2 node.

The core modules (camera, depth, superpixels, fusion, mapper, ...) import without
rclpy; only :mod:`surfel_mapping_node.node` needs ROS 2.
"""
